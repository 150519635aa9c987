//! What the client has sent on a connection and not seen answered yet, and which answer
//! belongs to which command.
//!
//! An ERROR names no command, but the server answers a connection's commands in the order it
//! received them (PROTOCOL.md 5.7), and each command can be refused only by the codes the
//! spec gives it: so a non-fatal ERROR is the answer of the whispers in front of the list (a
//! delivered whisper has no reply) or of the first other command, or of none. Keeping this
//! list is what lets the client re-send, after a reconnect, exactly the JOINs and LEAVEs
//! whose answers the broken connection never delivered.

use std::collections::VecDeque;

use chatloop::protocol::ErrorCode;

/// Why a JOIN was sent, which decides what its answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JoinWhy {
    /// The user's `/join` or `--join`.
    Asked,
    /// After a reconnect, for a room we were a member of.
    Rejoin,
    /// After a reconnect, for a JOIN whose answer the broken connection never delivered.
    Retry,
}

/// A command sent on the current connection whose answer has not arrived yet. An ERROR names
/// no command, but the server answers commands in the order it received them (PROTOCOL.md
/// 5.7), so the first command still waiting is the one it refuses.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    /// Answered by our own PRESENCE join, or an ERROR.
    Join { room: String, why: JoinWhy },
    /// Answered by our own PRESENCE leave, or an ERROR. `resent`: sent again after a
    /// reconnect because the broken connection never delivered the answer.
    Leave { room: String, resent: bool },
    /// Answered by our own MESSAGE in the room, or an ERROR.
    Say(String),
    /// Answered by the room's last ROSTER frame, or an ERROR.
    Who(String),
    /// This many whispers in a row (at least 1), each answered only when refused
    /// (`no_such_user`): a delivered whisper has no reply, which is known once a later
    /// command is answered. Whispers are indistinguishable in their answers, so a count is
    /// all there is to keep, and a session that only whispers keeps one entry, not one per
    /// whisper for as long as nothing else is answered.
    Whispers(u64),
    /// Answered by the PONG carrying this data; never refused.
    Ping(Vec<u8>),
    /// A HISTORY of this room (empty: the held whispers), answered by its HISTORY_END (after
    /// its HISTORY frames), or an ERROR. What the answer is for is kept beside, in the
    /// session's replays (`replay.rs`), one per `History` here, in the same order.
    History(String),
}

/// Adds a command just sent to `sent`, merging a whisper into the whispers just before it.
pub(super) fn track(sent: &mut VecDeque<Sent>, s: Sent) {
    if let (Sent::Whispers(more), Some(Sent::Whispers(n))) = (&s, sent.back_mut()) {
        *n = n.saturating_add(*more);
        return;
    }
    sent.push_back(s);
}

/// Removes and returns the first command in `sent` that the answer matches. The commands
/// before it must have been answered without a frame (delivered whispers): they go too.
pub(super) fn take_answered(
    sent: &mut VecDeque<Sent>,
    answers: impl Fn(&Sent) -> bool,
) -> Option<Sent> {
    let i = sent.iter().position(answers)?;
    sent.drain(..i);
    sent.pop_front()
}

/// Removes and returns the command that a non-fatal ERROR with `code` refuses; of a group of
/// whispers only the oldest is refused, returned as `Whispers(1)`. None if the ERROR can
/// answer no command waiting: it then removes nothing.
pub(super) fn take_refused(sent: &mut VecDeque<Sent>, code: u16) -> Option<Sent> {
    // Answers come in order, and whispers are the only commands answered by silence: the
    // ERROR is the answer of the whispers in front, or of the first other command, or of
    // none. Looking further would take a code that answers nothing (a newer server's, say)
    // as the refusal of a later command, and the command it skipped as answered.
    let other = sent.iter().position(|s| !matches!(s, Sent::Whispers(_)));
    if let Some(i) = other.filter(|&i| refuses(code, &sent[i])) {
        // The whispers in front were delivered. When they could have got this ERROR too
        // (refused, which a policy gives a SAY or a WHISPER alike; bad_payload), this is the
        // guess that leaves nothing stale. If wrong, the command's own answer is still to
        // come and finds it gone: a MESSAGE is only shown, an ERROR may be taken once for a
        // later command's. The other guess, if wrong, would leave the command waiting for
        // an answer that never comes, taking the answers of the commands after it until a
        // PONG clears the list.
        sent.drain(..i);
        return sent.pop_front();
    }
    match sent.front_mut() {
        Some(Sent::Whispers(n)) if refuses(code, &Sent::Whispers(1)) => {
            if *n > 1 {
                *n -= 1;
                Some(Sent::Whispers(1))
            } else {
                sent.pop_front()
            }
        }
        _ => None,
    }
}

/// Whether a non-fatal ERROR with `code` can be the answer to `s`: the errors PROTOCOL.md
/// 5.3 lists for the command, bad_payload (4.3), which every command but PING can get, and
/// refused (5.8), which an embedding application's policy may give a SAY or a WHISPER.
/// unknown_opcode answers only a HISTORY (0x0A): a server without section 12 of the protocol
/// does not know it, and the client sends no other opcode outside 0x01-0x09.
/// Not the others: hello_required a command sent before WELCOME, which tracked ones never are;
/// bad_nick, nick_taken and already_welcomed a HELLO, which is not tracked (nor is refused
/// for a HELLO: the session takes an ERROR before WELCOME as the HELLO's). An unknown code
/// answers none (PROTOCOL.md 6: a client goes by its fatal flag only).
pub(super) fn refuses(code: u16, s: &Sent) -> bool {
    use ErrorCode as E;
    let Some(code) = E::from_u16(code) else {
        return false;
    };
    match s {
        Sent::Join { .. } => matches!(
            code,
            E::BadPayload | E::BadRoom | E::AlreadyInRoom | E::TooManyRooms
        ),
        Sent::Leave { .. } => matches!(code, E::BadPayload | E::BadRoom | E::NotInRoom),
        // refused comes only after the checks of 5.3 passed.
        Sent::Say(_) => matches!(code, E::BadPayload | E::BadRoom | E::NotInRoom | E::Refused),
        Sent::Who(_) => matches!(code, E::BadPayload | E::BadRoom),
        // A string that is not a valid nick matches no one: no_such_user, not bad_nick. With
        // whispers in front of another command, bad_payload (or refused) goes to the oldest
        // whisper: the encoder never sends a malformed payload, so that guess is never made
        // for real; and a refused whisper is the oldest one not yet answered, since answers
        // come in order.
        Sent::Whispers(_) => matches!(code, E::BadPayload | E::NoSuchUser | E::Refused),
        // PING's data is opaque: nothing in it can fail to decode.
        Sent::Ping(_) => false,
        // PROTOCOL.md 12.2; not_in_room and bad_room only for a room, not for the whispers.
        Sent::History(_) => matches!(
            code,
            E::BadPayload | E::BadRoom | E::NotInRoom | E::UnknownOpcode
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(room: &str) -> Sent {
        Sent::Join {
            room: room.into(),
            why: JoinWhy::Asked,
        }
    }

    #[test]
    fn answers_are_matched_in_order_past_delivered_whispers() {
        let bad_room = ErrorCode::BadRoom.code();
        let no_such_user = ErrorCode::NoSuchUser.code();
        let mut sent = VecDeque::from([
            Sent::Whispers(1),
            join("a"),
            Sent::Whispers(1),
            Sent::Say("a".into()),
        ]);
        // The first whisper was delivered: the ERROR is the JOIN's.
        assert_eq!(take_refused(&mut sent, bad_room), Some(join("a")));
        // no_such_user refuses the whisper, not the SAY after it.
        assert_eq!(
            take_refused(&mut sent, no_such_user),
            Some(Sent::Whispers(1))
        );
        assert_eq!(sent, [Sent::Say("a".into())]);

        // A PONG answers its PING; the whisper before it was delivered.
        let mut sent = VecDeque::from([Sent::Whispers(1), Sent::Ping(b"x".to_vec())]);
        assert_eq!(
            take_answered(&mut sent, |s| matches!(s, Sent::Ping(d) if d == b"x")),
            Some(Sent::Ping(b"x".to_vec()))
        );
        assert!(sent.is_empty());

        // An ERROR that can answer nothing waiting removes nothing.
        let mut sent = VecDeque::from([Sent::Whispers(1), Sent::Ping(b"y".to_vec())]);
        assert_eq!(take_refused(&mut sent, bad_room), None);
        assert_eq!(sent.len(), 2);
    }

    #[test]
    fn many_whispers_keep_the_list_bounded() {
        let bad_room = ErrorCode::BadRoom.code();
        let no_such_user = ErrorCode::NoSuchUser.code();
        let mut sent = VecDeque::new();
        for _ in 0..10_000 {
            track(&mut sent, Sent::Whispers(1));
        }
        assert_eq!(sent.len(), 1, "one entry for consecutive whispers");
        assert_eq!(sent, [Sent::Whispers(10_000)]);
        track(&mut sent, join("a"));
        for _ in 0..3 {
            track(&mut sent, Sent::Whispers(1));
        }
        track(&mut sent, Sent::Say("a".into()));
        assert_eq!(
            sent,
            [
                Sent::Whispers(10_000),
                join("a"),
                Sent::Whispers(3),
                Sent::Say("a".into())
            ]
        );

        // no_such_user refuses the oldest whisper only.
        assert_eq!(
            take_refused(&mut sent, no_such_user),
            Some(Sent::Whispers(1))
        );
        assert_eq!(sent[0], Sent::Whispers(9_999));
        // An ERROR for the JOIN: the whispers before it were delivered.
        assert_eq!(take_refused(&mut sent, bad_room), Some(join("a")));
        assert_eq!(sent, [Sent::Whispers(3), Sent::Say("a".into())]);
        // The last whisper of a group refused takes the group with it.
        for left in [2, 1] {
            assert_eq!(
                take_refused(&mut sent, no_such_user),
                Some(Sent::Whispers(1))
            );
            assert_eq!(sent[0], Sent::Whispers(left));
        }
        assert_eq!(
            take_refused(&mut sent, no_such_user),
            Some(Sent::Whispers(1))
        );
        assert_eq!(sent, [Sent::Say("a".into())]);
        // The SAY's own MESSAGE answers it.
        assert_eq!(
            take_answered(&mut sent, |s| matches!(s, Sent::Say(r) if r == "a")),
            Some(Sent::Say("a".into()))
        );
        assert!(sent.is_empty());
    }

    #[test]
    fn each_command_is_refused_only_by_the_codes_the_protocol_gives_it() {
        let say = || Sent::Say("a".into());
        let leave = || Sent::Leave {
            room: "a".into(),
            resent: false,
        };
        let who = || Sent::Who("a".into());
        let ping = || Sent::Ping(b"p".to_vec());
        let whispers = || Sent::Whispers(1);
        let history = || Sent::History("a".into());
        type Made = fn() -> Sent;
        let cases: [(&str, Made, &[u16]); 7] = [
            ("JOIN", || join("a"), &[5, 10, 12, 20]),
            ("LEAVE", leave, &[5, 10, 11]),
            ("SAY", say, &[5, 10, 11, 22]),
            ("WHO", who, &[5, 10]),
            ("WHISPER", whispers, &[5, 13, 22]),
            ("PING", ping, &[]),
            ("HISTORY", history, &[4, 5, 10, 11]),
        ];
        for (name, made, codes) in cases {
            for code in (0..=30).chain([999, u16::MAX]) {
                assert_eq!(
                    refuses(code, &made()),
                    codes.contains(&code),
                    "{name} and code {code}"
                );
            }
        }
    }

    #[test]
    fn refused_goes_to_the_say_behind_the_whispers_and_else_to_the_oldest_whisper() {
        let refused = ErrorCode::Refused.code();
        // Whispers, then a SAY: either could be the one refused. Taken as the SAY's, the
        // whispers delivered: nothing is left waiting for an answer that may never come.
        let mut sent = VecDeque::from([Sent::Whispers(2), Sent::Say("a".into()), join("b")]);
        assert_eq!(
            take_refused(&mut sent, refused),
            Some(Sent::Say("a".into()))
        );
        assert_eq!(sent, [join("b")]);
        // A JOIN cannot be refused by a policy: the oldest whisper was.
        let mut sent = VecDeque::from([Sent::Whispers(2), join("b"), Sent::Say("a".into())]);
        assert_eq!(take_refused(&mut sent, refused), Some(Sent::Whispers(1)));
        assert_eq!(sent, [Sent::Whispers(1), join("b"), Sent::Say("a".into())]);
        assert_eq!(take_refused(&mut sent, refused), Some(Sent::Whispers(1)));
        assert_eq!(sent, [join("b"), Sent::Say("a".into())]);
        // Nor a WHO or a PING: refused then answers nothing waiting.
        let mut sent = VecDeque::from([Sent::Who("a".into()), Sent::Ping(b"p".to_vec())]);
        assert_eq!(take_refused(&mut sent, refused), None);
        assert_eq!(sent.len(), 2);
        // Whispers alone.
        let mut sent = VecDeque::from([Sent::Whispers(1)]);
        assert_eq!(take_refused(&mut sent, refused), Some(Sent::Whispers(1)));
        assert!(sent.is_empty());
    }

    #[test]
    fn an_error_that_answers_no_command_waiting_takes_none() {
        let bad_room = ErrorCode::BadRoom.code();
        let mut sent = VecDeque::from([Sent::Whispers(2), join("a"), Sent::Say("a".into())]);
        // A code no command gets (a newer server's): the JOIN still waits for its answer,
        // and the whispers are not taken as delivered.
        assert_eq!(take_refused(&mut sent, 999), None);
        // not_in_room cannot refuse the JOIN, which comes first: not the SAY's either.
        assert_eq!(take_refused(&mut sent, ErrorCode::NotInRoom.code()), None);
        assert_eq!(
            take_refused(&mut sent, ErrorCode::UnknownOpcode.code()),
            None
        );
        assert_eq!(sent.len(), 3);
        assert_eq!(take_refused(&mut sent, bad_room), Some(join("a")));
        assert_eq!(
            take_refused(&mut sent, bad_room),
            Some(Sent::Say("a".into()))
        );
        assert!(sent.is_empty());
    }
}
