//! Machinery shared by the commands, the timers and the application's commands: errors,
//! fatal closes, presence delivery, and removing members and sessions.

use std::time::Instant;

use super::{Awaiting, Chat, CloseReason, Event, Relay, RoomId, fold, is_held, token_key};
use crate::id::ConnId;
use crate::protocol::{ErrorCode, PresenceKind, encode};

/// Longest ERROR detail sent, in bytes: with the code and flag it fits the server's slack over
/// max_frame (128 bytes) even when max_frame is tiny.
pub(super) const MAX_DETAIL: usize = 120;

/// `s` cut to at most `max` bytes, at a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Chat {
    pub(super) fn send_error(&mut self, conn: ConnId, code: ErrorCode, detail: &str) {
        // A detail may come from an application (a hook's rejection, a kick); cut it so the
        // payload stays far inside max_frame + SERVER_SLACK whatever max_frame is.
        let detail = truncate(detail, MAX_DETAIL);
        let (buf, start) = self.outbox.buf();
        encode::error(buf, code, detail);
        let end = buf.len();
        self.outbox.send(conn, start, end);
        self.stats.errors_sent[code.code() as usize] += 1;
    }

    /// Sends a fatal ERROR, ends the session (PRESENCE gone) and asks for the close.
    pub(super) fn fatal(
        &mut self,
        conn: ConnId,
        code: ErrorCode,
        detail: &str,
        reason: CloseReason,
    ) {
        debug_assert!(code.is_fatal());
        self.send_error(conn, code, detail);
        self.remove_session(conn, Some(PresenceKind::Gone), reason);
        if !is_held(conn) {
            self.closes.push_back((conn, reason));
        }
    }

    /// Ends `conn` as a slow consumer: what the core queued for it in this round is dropped,
    /// it gets the fatal ERROR, its rooms PRESENCE gone, and the close is asked for. The one
    /// place this is decided and logged, whether the core or the transport found it.
    pub(super) fn slow_consumer(
        &mut self,
        now: Instant,
        conn: ConnId,
        why: std::fmt::Arguments<'_>,
    ) {
        let peer = self.state(conn).and_then(|s| s.peer);
        // A thousand members cut in one iteration are one line and a count, not a thousand.
        if self.warn_slow.should_log(now) {
            match peer {
                Some(peer) => log::warn!("conn {conn} ({peer}): slow consumer, {why}; closing"),
                None => log::warn!("conn {conn}: slow consumer, {why}; closing"),
            }
        } else {
            log::debug!("conn {conn}: slow consumer, {why}; closing");
        }
        self.outbox.discard(conn);
        self.fatal(
            conn,
            ErrorCode::SlowConsumer,
            "too much output queued",
            CloseReason::SlowConsumer,
        );
    }

    /// Sends a PRESENCE about `who` in `rid` to the room, or only to `who` when the room has
    /// more than presence_limit members (the count includes `who`, who must still be a member).
    pub(super) fn presence(&mut self, rid: RoomId, kind: PresenceKind, who: ConnId, nick: &str) {
        if self.cfg.relay {
            // The room spans nodes: everyone, here too, gets it when the backbone brings it
            // back, in the room's one order; the joiner too, so that its JOIN's answer comes
            // once its node receives the room (whatever is said after it reaches it). A
            // leaver is no member by then: it has its answer now.
            let room = &self.rooms[rid.0];
            if kind == PresenceKind::Leave {
                let (buf, start) = self.outbox.buf();
                encode::presence(buf, kind, &room.name, nick);
                let end = buf.len();
                self.outbox.send(who, start, end);
            }
            self.relay.push_back(Relay::Presence {
                room: room.name.clone(),
                kind,
                nick: nick.into(),
            });
            return;
        }
        let room = &self.rooms[rid.0];
        let (buf, start) = self.outbox.buf();
        encode::presence(buf, kind, &room.name, nick);
        let end = buf.len();
        let to_all = room.members.len() <= self.cfg.presence_limit;
        let self_too = matches!(kind, PresenceKind::Join | PresenceKind::Leave);
        if to_all {
            let except = (!self_too).then_some(who);
            self.outbox.send_all(&room.members, except, start, end);
        } else if self_too {
            self.outbox.send(who, start, end);
        }
    }

    /// Removes the `pos`th room of `conn`'s session from it, and `conn` from that room.
    pub(super) fn remove_member(&mut self, conn: ConnId, pos: usize) {
        let Some(s) = self.state_mut(conn) else {
            return;
        };
        let (rid, idx) = s.rooms.swap_remove(pos);
        let room = &mut self.rooms[rid.0];
        debug_assert_eq!(room.members[idx as usize], conn);
        room.unmark_removed(idx as usize);
        room.members.swap_remove(idx as usize);
        room.joining.retain(|&c| c != conn);
        if let Some(&moved) = room.members.get(idx as usize) {
            // The last member took the leaver's place: record its new index.
            if let Some(ms) = self.state_mut(moved) {
                if let Some(e) = ms.rooms.iter_mut().find(|e| e.0 == rid) {
                    e.1 = idx;
                }
            }
        }
        if self.rooms[rid.0].members.is_empty() {
            let mut room = self.rooms.remove(rid.0);
            let newest = room.history.newest();
            if newest > 0 {
                if self.closed_rooms.len() >= super::CLOSED_ROOMS {
                    let forgotten = self.closed_rooms.drain().map(|(_, id)| id).max();
                    self.closed_floor = self.closed_floor.max(forgotten.unwrap_or(0));
                }
                self.closed_rooms.insert(room.name.clone(), newest);
            }
            self.store.drop_stream(std::mem::take(&mut room.history));
            self.room_index.remove(&room.name);
            if self.cfg.relay {
                self.relay.push_back(Relay::Closed { room: room.name });
            }
        }
    }

    /// Ends `conn`'s session: PRESENCE `kind` to its rooms (none if `None`), leaves them, frees
    /// nick, token and timer. Output already queued for `conn` stays queued.
    pub(super) fn remove_session(
        &mut self,
        conn: ConnId,
        kind: Option<PresenceKind>,
        reason: CloseReason,
    ) {
        if kind == Some(PresenceKind::Gone) && self.holds(conn, reason) {
            self.hold(conn, reason);
            return;
        }
        let Some(s) = self.state(conn) else { return };
        let nick = s.nick.clone();
        let welcomed = s.welcomed;
        let held = is_held(conn);
        while let Some(&(rid, _)) = self.state(conn).and_then(|s| s.rooms.last()) {
            if let Some(kind) = kind {
                self.presence(rid, kind, conn, &nick);
            }
            let last = self.state(conn).map_or(0, |s| s.rooms.len() - 1);
            let name = self.rooms[rid.0].name.clone();
            self.remove_member(conn, last);
            self.hooks.on_leave(conn, &nick, &name);
            self.event(|| Event::Left {
                conn,
                nick: nick.clone(),
                room: name,
            });
        }
        let Some(s) = self.take_state(conn) else {
            return;
        };
        self.timers.cancel(s.timer);
        self.drop_whispers(conn);
        if welcomed {
            self.nicks.remove(&fold(&s.nick));
            self.tokens.remove(&token_key(&s.token));
            // A session handed over to another node (taken over from there) keeps its nick
            // and token in the cluster: they are the other node's now.
            if self.cfg.relay && reason != CloseReason::TakenOver {
                self.relay.push_back(Relay::Release {
                    nick: s.nick.clone(),
                    token: Some(s.token),
                });
            }
        }
        self.crossing.remove(&conn);
        if let Some((Awaiting::Claim(nick), _)) = self.awaiting.remove(&conn) {
            // Its answer will find no one (`handle_claim` hands a granted nick back).
            self.claimed.remove(&fold(&nick));
        }
        if !held {
            // A held session's connection was counted when it was lost.
            self.open -= 1;
            self.stats.closed.count(reason);
        }
        log::debug!("conn {conn}: session ended ({reason})");
        self.hooks
            .on_close(conn, welcomed.then_some(&*s.nick), reason);
        self.event(|| Event::Closed {
            conn,
            nick: welcomed.then_some(s.nick),
            reason,
        });
    }
}
