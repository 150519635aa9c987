//! The client commands: HELLO (new session and resume), JOIN, LEAVE, SAY, WHISPER, WHO.
//!
//! Each handler checks its rules in the order docs/PROTOCOL.md gives, answers a failed check
//! with a non-fatal ERROR and leaves the state unchanged, and otherwise changes the state and
//! queues the resulting frames in the outbox, encoded once however many recipients they have.

use std::time::Instant;

use super::outbox::Outbox;
use super::{
    Awaiting, Chat, CloseReason, Event, HelloInfo, Relay, Room, RoomId, UNMARKED, Verdict, ct_eq,
    fold, is_held, os_token, token_key,
};
use crate::id::ConnId;
use crate::protocol::{
    self, ErrorCode, HEADER_LEN, PresenceKind, SERVER_SLACK, SessionToken, encode, op,
};
use crate::untrusted::Untrusted;

impl Chat {
    pub(super) fn hello(
        &mut self,
        now: Instant,
        conn: ConnId,
        nick: &str,
        token: Option<SessionToken>,
    ) {
        let resume = token.and_then(|t| self.session_by_token(&t));
        let peer = self.state(conn).and_then(|s| s.peer);
        let info = HelloInfo {
            conn,
            nick,
            peer,
            token: token.as_ref(),
            resumes: resume.is_some(),
        };
        if let Err(r) = self.hooks.on_hello(&info) {
            log::debug!(
                "conn {conn}: HELLO rejected by hook: {} {}",
                r.code,
                Untrusted(&r.detail)
            );
            if r.code.is_fatal() {
                self.fatal(conn, r.code, &r.detail, CloseReason::Protocol(r.code));
            } else {
                self.send_error(conn, r.code, &r.detail);
            }
            return;
        }
        if let Some(old) = resume {
            self.resume(now, conn, old);
            return;
        }
        if let Some(token) = token.filter(|_| self.cfg.relay && self.relay_up) {
            // Not a session here: perhaps another node's. The cluster looks.
            self.awaiting.insert(
                conn,
                (
                    Awaiting::Resume {
                        nick: nick.into(),
                        token,
                    },
                    Vec::new(),
                ),
            );
            self.relay.push_back(Relay::Resume { conn, token });
            return;
        }
        if token.is_some() {
            self.stats.resume_failures += 1;
            log::debug!("conn {conn}: HELLO with a token that matches no live session");
        }
        self.hello_new(now, conn, nick);
    }

    /// The rest of a HELLO for a new session: the nick's checks, then the session (or, in a
    /// cluster, the claim that decides it).
    pub(super) fn hello_new(&mut self, now: Instant, conn: ConnId, nick: &str) {
        if !protocol::valid_nick(nick) {
            self.send_error(
                conn,
                ErrorCode::BadNick,
                "nick must be 1 to 32 bytes of UTF-8 without spaces, control or format characters",
            );
            return;
        }
        let folded = fold(nick);
        if self.nicks.contains_key(&folded) || self.claimed.contains_key(&folded) {
            self.send_error(conn, ErrorCode::NickTaken, "nick is taken");
            return;
        }
        if self.cfg.relay {
            // Free here; the cluster decides (`handle_claim`).
            self.claimed.insert(folded, conn);
            self.awaiting
                .insert(conn, (Awaiting::Claim(nick.into()), Vec::new()));
            self.relay.push_back(Relay::Claim {
                conn,
                nick: nick.into(),
            });
            return;
        }
        self.start_session(now, conn, nick);
    }

    /// Welcomes `conn` as a new session named `nick` (free, and valid).
    pub(super) fn start_session(&mut self, now: Instant, conn: ConnId, nick: &str) {
        let folded = fold(nick);
        let token = self.fresh_token();
        self.nicks.insert(folded, conn);
        self.tokens.insert(token_key(&token), conn);
        if let Some(s) = self.state_mut(conn) {
            s.welcomed = true;
            s.nick = nick.into();
            s.token = token;
        }
        self.stats.sessions_started += 1;
        if self.cfg.relay {
            self.relay.push_back(Relay::Token {
                nick: nick.into(),
                token,
                old: None,
            });
        }
        log::debug!("conn {conn}: welcomed as {}", Untrusted(nick));
        self.event(|| Event::Welcomed {
            conn,
            nick: nick.into(),
            resumed_from: None,
        });
        self.welcome(now, conn);
    }

    /// The live session whose token is `t`, compared in constant time.
    pub(super) fn session_by_token(&self, t: &SessionToken) -> Option<ConnId> {
        let conn = *self.tokens.get(&token_key(t))?;
        let s = self.state(conn)?;
        ct_eq(&s.token, t).then_some(conn)
    }

    /// A token whose index no live session uses. A source that keeps repeating itself (a
    /// broken test double) is given up on after a few tries in favour of the OS.
    pub(super) fn fresh_token(&mut self) -> SessionToken {
        for _ in 0..16 {
            let t = (self.token_source)();
            if !self.tokens.contains_key(&token_key(&t)) {
                return t;
            }
        }
        loop {
            let t = os_token();
            if !self.tokens.contains_key(&token_key(&t)) {
                return t;
            }
        }
    }

    /// Sends WELCOME and moves the connection's timer from the hello deadline to the heartbeat.
    pub(super) fn welcome(&mut self, now: Instant, conn: ConnId) {
        let hb_ms = u32::try_from(self.cfg.heartbeat.as_millis()).unwrap_or(u32::MAX);
        let max_frame = self.cfg.max_frame;
        let deadline = now + self.cfg.heartbeat;
        let old_timer = match self.state(conn) {
            Some(s) => s.timer,
            None => return,
        };
        self.timers.cancel(old_timer);
        let timer = self.timers.schedule(deadline, conn.to_u64());
        let Some(s) = self.conns[conn.slot()].as_mut() else {
            return;
        };
        s.timer = timer;
        let conn_id = match &mut self.wire_ids {
            Some((base, k)) if *k < 1 << 40 => {
                *k += 1;
                *base | (*k - 1)
            }
            _ => conn.to_u64(),
        };
        let (buf, start) = self.outbox.buf();
        encode::welcome(buf, conn_id, &s.token, max_frame, hb_ms, &s.nick);
        let end = buf.len();
        self.outbox.send(conn, start, end);
    }

    /// `new` takes over the session of `old`: nick, rooms and membership order, without PRESENCE.
    /// `old` gets session_taken_over and is closed; the old token stops working.
    /// A held session (`old` is its held id) is resumed the same way, without the ERROR and
    /// the close: its connection is gone already.
    pub(super) fn resume(&mut self, now: Instant, new: ConnId, old: ConnId) {
        let was_held = is_held(old);
        let Some(mut prev) = self.take_state(old) else {
            return;
        };
        self.timers.cancel(prev.timer);
        if !was_held {
            self.open -= 1;
        }
        self.tokens.remove(&token_key(&prev.token));
        let token = self.fresh_token();
        self.tokens.insert(token_key(&token), new);
        self.nicks.insert(fold(&prev.nick), new);
        if self.cfg.relay {
            self.relay.push_back(Relay::Token {
                nick: prev.nick.clone(),
                token,
                old: Some(prev.token),
            });
        }
        // The new connection has received nothing of its rooms: a HISTORY recovers all that
        // came before its first live message (what the old connection missed, or never
        // wrote out).
        for &(rid, idx) in &prev.rooms {
            let room = &mut self.rooms[rid.0];
            debug_assert_eq!(room.members[idx as usize], old);
            room.members[idx as usize] = new;
            room.unmark(idx as usize);
            for j in room.joining.iter_mut().filter(|j| **j == old) {
                *j = new;
            }
        }
        self.rekey_whispers(old, new);
        log::debug!(
            "conn {new}: resumed the session of {} ({})",
            Untrusted(&prev.nick),
            old
        );
        let nick = std::mem::take(&mut prev.nick);
        let rooms = std::mem::take(&mut prev.rooms);
        if let Some(s) = self.state_mut(new) {
            s.welcomed = true;
            s.nick = nick;
            s.rooms = rooms;
            s.token = token;
        }
        self.stats.resumes += 1;
        if was_held {
            self.stats.held_resumed += 1;
            if let Some(s) = self.state(new) {
                let nick = s.nick.clone();
                self.event(|| Event::Welcomed {
                    conn: new,
                    nick,
                    resumed_from: Some(old),
                });
            }
            self.welcome(now, new);
            return;
        }
        self.send_error(
            old,
            ErrorCode::SessionTakenOver,
            "another connection resumed this session",
        );
        self.closes.push_back((old, CloseReason::TakenOver));
        self.stats.closed.count(CloseReason::TakenOver);
        if let Some(s) = self.state(new) {
            let nick = s.nick.clone();
            self.hooks
                .on_close(old, Some(&nick), CloseReason::TakenOver);
            self.event(|| Event::Closed {
                conn: old,
                nick: Some(nick.clone()),
                reason: CloseReason::TakenOver,
            });
            self.event(|| Event::Welcomed {
                conn: new,
                nick,
                resumed_from: Some(old),
            });
        }
        self.welcome(now, new);
    }

    pub(super) fn join(&mut self, conn: ConnId, room: &str) {
        if !protocol::valid_room(room) {
            self.send_error(
                conn,
                ErrorCode::BadRoom,
                "room must be 1 to 64 bytes of UTF-8 without spaces, control or format characters",
            );
            return;
        }
        let existing = self.room_index.get(room).copied();
        let Some(s) = self.state(conn) else { return };
        if existing.is_some_and(|rid| s.rooms.iter().any(|&(r, _)| r == rid)) {
            self.send_error(conn, ErrorCode::AlreadyInRoom, "already in that room");
            return;
        }
        if s.rooms.len() >= self.cfg.max_rooms_per_conn {
            let detail = format!(
                "at most {} rooms per connection",
                self.cfg.max_rooms_per_conn
            );
            self.send_error(conn, ErrorCode::TooManyRooms, &detail);
            return;
        }
        let Some(rid) = self.add_member(conn, room) else {
            return;
        };
        if self.cfg.relay {
            self.rooms[rid.0].joining.push(conn);
            self.crossing.insert(conn, true);
        }
        let Some(nick) = self.state(conn).map(|s| s.nick.clone()) else {
            return;
        };
        self.presence(rid, PresenceKind::Join, conn, &nick);
        self.hooks.on_join(conn, &nick, room);
        self.event(|| Event::Joined {
            conn,
            nick,
            room: room.into(),
        });
    }

    /// Makes `conn` a member of `room` (created if new), with no PRESENCE; `None` if `conn`
    /// has no session.
    pub(super) fn add_member(&mut self, conn: ConnId, room: &str) -> Option<RoomId> {
        self.state(conn)?;
        let existing = self.room_index.get(room).copied();
        let rid = existing.unwrap_or_else(|| {
            let id = RoomId(self.rooms.insert(Room {
                name: room.into(),
                members: Vec::new(),
                joining: Vec::new(),
                history: super::history::Stream::starting_after(
                    self.closed_rooms.remove(room).unwrap_or(self.closed_floor),
                ),
                marks: Vec::new(),
                unmarked: Vec::new(),
            }));
            self.room_index.insert(room.into(), id);
            if self.cfg.relay {
                self.relay.push_back(Relay::Opened { room: room.into() });
            }
            id
        });
        let room = &mut self.rooms[rid.0];
        let idx = room.members.len() as u32;
        room.members.push(conn);
        room.marks.push(UNMARKED);
        room.unmarked.push(idx);
        self.state_mut(conn)?.rooms.push((rid, idx));
        Some(rid)
    }

    pub(super) fn leave(&mut self, conn: ConnId, room: &str) {
        if !protocol::valid_room(room) {
            self.send_error(conn, ErrorCode::BadRoom, "invalid room name");
            return;
        }
        let rid = self.room_index.get(room).copied();
        let Some(s) = self.state(conn) else { return };
        let Some(pos) = rid.and_then(|rid| s.rooms.iter().position(|&(r, _)| r == rid)) else {
            self.send_error(conn, ErrorCode::NotInRoom, "not in that room");
            return;
        };
        let nick = s.nick.clone();
        let (rid, _) = s.rooms[pos];
        self.presence(rid, PresenceKind::Leave, conn, &nick);
        self.remove_member(conn, pos);
        self.hooks.on_leave(conn, &nick, room);
        self.event(|| Event::Left {
            conn,
            nick,
            room: room.into(),
        });
    }

    pub(super) fn say(&mut self, conn: ConnId, room: &str, text: &str) {
        if !protocol::valid_room(room) {
            self.send_error(conn, ErrorCode::BadRoom, "invalid room name");
            return;
        }
        let rid = self.room_index.get(room).copied();
        let Some(s) = self.state(conn) else { return };
        let Some(rid) = rid.filter(|&rid| s.rooms.iter().any(|&(r, _)| r == rid)) else {
            self.send_error(conn, ErrorCode::NotInRoom, "not in that room");
            return;
        };
        let nick = s.nick.clone();
        let verdict = self.hooks.on_say(conn, &nick, room, text);
        if self.vetoed(conn, verdict) {
            return;
        }
        if self.cfg.relay {
            self.relay.push_back(Relay::Say {
                room: room.into(),
                from: nick,
                text: text.into(),
            });
            self.crossing.entry(conn).or_insert(false);
            return;
        }
        self.broadcast_message(rid, Some(conn), &nick, text);
    }

    /// A MESSAGE from `from` (`sender` `None`: the application) to every member of `rid`.
    pub(super) fn broadcast_message(
        &mut self,
        rid: RoomId,
        sender: Option<ConnId>,
        from: &str,
        text: &str,
    ) {
        let msg_id = self.local_msg_id();
        self.broadcast_message_with(rid, sender, from, text, msg_id);
    }

    /// [`broadcast_message`](Self::broadcast_message) with a given msg_id.
    pub(super) fn broadcast_message_with(
        &mut self,
        rid: RoomId,
        sender: Option<ConnId>,
        from: &str,
        text: &str,
        msg_id: u64,
    ) {
        let room = &self.rooms[rid.0];
        let (buf, start) = self.outbox.buf();
        encode::message(buf, msg_id, &room.name, from, text);
        let end = buf.len();
        let receivers = room.receivers();
        self.outbox.send_all(&receivers, None, start, end);
        let recipients = receivers.len();
        if !room.unmarked.is_empty() {
            // Members receiving their first live message of the room: HISTORY gives them
            // what came before it, never it or what follows.
            self.rooms[rid.0].mark_receivers(msg_id);
        }
        self.record_message(rid, msg_id, start, end);
        self.stats.messages += 1;
        self.stats.deliveries += recipients as u64;
        if self.events_enabled() {
            let room = self.rooms[rid.0].name.clone();
            self.event(|| Event::Said {
                from: sender,
                room,
                msg_id,
                recipients,
            });
        }
    }

    pub(super) fn whisper_from(&mut self, conn: ConnId, target: &str, text: &str) {
        if self.cfg.relay && self.relay_up {
            // The holder may be on any node: the cluster finds it, and numbers the whisper.
            let Some(nick) = self.nick(conn).map(Box::<str>::from) else {
                return;
            };
            let verdict = self.hooks.on_whisper(conn, &nick, target, text);
            if self.vetoed(conn, verdict) {
                return;
            }
            self.awaiting.insert(conn, (Awaiting::Whisper, Vec::new()));
            self.relay.push_back(Relay::Whisper {
                conn,
                from: nick,
                to: target.into(),
                text: text.into(),
            });
            return;
        }
        let Some(to) = self.conn_of(target) else {
            self.send_error(conn, ErrorCode::NoSuchUser, "no such user");
            return;
        };
        let Some(nick) = self.nick(conn).map(Box::<str>::from) else {
            return;
        };
        let to_nick = self.nick(to).map(Box::<str>::from).unwrap_or_default();
        let verdict = self.hooks.on_whisper(conn, &nick, &to_nick, text);
        if self.vetoed(conn, verdict) {
            return;
        }
        self.deliver_whisper(Some(conn), to, &nick, text);
    }

    /// Carries out a delivery hook's veto, if it is one; true if nothing is to be delivered.
    /// A veto uses no msg_id.
    fn vetoed(&mut self, conn: ConnId, verdict: Verdict) -> bool {
        if verdict != Verdict::Deliver {
            self.stats.vetoed += 1;
            self.event(|| Event::Vetoed { conn });
        }
        match verdict {
            Verdict::Deliver => false,
            Verdict::Drop => true,
            Verdict::Reject(r) => {
                log::debug!(
                    "conn {conn}: refused by hook: {} {}",
                    r.code,
                    Untrusted(&r.detail)
                );
                if r.code.is_fatal() {
                    self.fatal(conn, r.code, &r.detail, CloseReason::Protocol(r.code));
                } else {
                    self.send_error(conn, r.code, &r.detail);
                }
                true
            }
        }
    }

    /// A WHISPER from `from` (`sender` `None`: the application) to `to`.
    pub(super) fn deliver_whisper(
        &mut self,
        sender: Option<ConnId>,
        to: ConnId,
        from: &str,
        text: &str,
    ) {
        let msg_id = self.local_msg_id();
        self.deliver_whisper_with(sender, to, from, text, msg_id);
    }

    /// The next msg_id this node assigns itself. In a cluster the cluster's ids are even
    /// (the backbone counts in twos) and a node's own are odd, above every id it has seen:
    /// strictly increasing on every connection, and never equal to a cluster id.
    pub(super) fn local_msg_id(&mut self) -> u64 {
        let mut id = self.next_msg_id;
        if self.cfg.relay && id % 2 == 0 {
            id += 1;
        }
        self.next_msg_id = id + 1;
        id
    }

    /// [`deliver_whisper`](Self::deliver_whisper) with a given msg_id.
    pub(super) fn deliver_whisper_with(
        &mut self,
        sender: Option<ConnId>,
        to: ConnId,
        from: &str,
        text: &str,
        msg_id: u64,
    ) {
        let (buf, start) = self.outbox.buf();
        encode::whisper(buf, msg_id, from, text);
        let end = buf.len();
        if is_held(to) {
            // Its connection is gone: kept for its HISTORY after a resume.
            self.hold_whisper(to, msg_id, start, end);
        } else {
            self.outbox.send(to, start, end);
        }
        self.stats.whispers += 1;
        self.stats.deliveries += 1;
        self.event(|| Event::Whispered {
            from: sender,
            to,
            msg_id,
        });
    }

    pub(super) fn who(&mut self, conn: ConnId, room: &str) {
        if !protocol::valid_room(room) {
            self.send_error(conn, ErrorCode::BadRoom, "invalid room name");
            return;
        }
        if self.cfg.relay && self.relay_up {
            // The room's members on every node: the cluster lists them.
            self.awaiting.insert(conn, (Awaiting::Who, Vec::new()));
            self.relay.push_back(Relay::Who {
                conn,
                room: room.into(),
            });
            return;
        }
        let rid = self.room_index.get(room).copied();
        let members = rid.map_or(&[][..], |rid| &self.rooms[rid.0].members[..]);
        let (conns, held) = (&self.conns, &self.held);
        // Held members are members: WHO lists them, as PRESENCE told nobody they left.
        let nicks = members.iter().filter_map(|m| {
            let s = if is_held(*m) {
                held.get(m.slot() - super::HELD_BASE)
            } else {
                conns[m.slot()].as_ref()
            };
            s.map(|s| &*s.nick)
        });
        let budget = self.cfg.max_frame as usize + SERVER_SLACK as usize;
        send_roster(&mut self.outbox, budget, conn, room, nicks);
    }

    /// ROSTER frames for `room` listing `nicks`, to `conn`.
    pub(super) fn send_roster_of<'a>(
        &mut self,
        conn: ConnId,
        room: &str,
        nicks: impl Iterator<Item = &'a str>,
    ) {
        let budget = self.cfg.max_frame as usize + SERVER_SLACK as usize;
        send_roster(&mut self.outbox, budget, conn, room, nicks);
    }
}

/// Encodes the ROSTER frames of one WHO into `outbox`, for `conn`. Each payload stays within
/// `budget` (max_frame + SERVER_SLACK); the slack alone fits the longest room name plus one
/// longest nick, so every frame carries at least one nick.
fn send_roster<'a>(
    outbox: &mut Outbox,
    budget: usize,
    conn: ConnId,
    room: &str,
    nicks: impl Iterator<Item = &'a str>,
) {
    let (buf, first) = outbox.buf();
    let mut start = encode::roster_begin(buf, room);
    let mut extra_frames = 0;
    for nick in nicks {
        let payload = buf.len() - start - HEADER_LEN;
        let count_is_zero = payload == encode::roster_overhead(room.len());
        if payload + 2 + nick.len() > budget && !count_is_zero {
            encode::roster_end(buf, start, true);
            start = encode::roster_begin(buf, room);
            extra_frames += 1;
        }
        encode::roster_push(buf, start, nick);
    }
    encode::roster_end(buf, start, false);
    let end = buf.len();
    outbox.send(conn, first, end);
    // One range carries every ROSTER frame of this WHO; `send` counted the first.
    outbox.frames_out[usize::from(op::S_ROSTER)] += extra_frames;
}
