//! Typed messages: decoding payloads into borrowed values and encoding values into frames.
//!
//! Decoding borrows from the payload (no allocation). Encoding appends whole frames, header
//! included, to a caller's buffer, so a broadcast is encoded exactly once.

use super::wire::{
    FieldError, Reader, begin_frame, end_frame, put_str, put_u8, put_u16, put_u32, put_u64,
};
use super::{ErrorCode, HistoryStatus, PresenceKind, SessionToken, TOKEN_LEN, op};

/// Why a frame's payload could not be decoded into a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The opcode is not one this side accepts.
    UnknownOpcode(u8),
    /// The payload does not match the opcode's layout; the text says how.
    BadPayload(&'static str),
}

impl DecodeError {
    /// The protocol error code to answer with.
    pub fn code(self) -> ErrorCode {
        match self {
            DecodeError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
            DecodeError::BadPayload(_) => ErrorCode::BadPayload,
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownOpcode(op) => write!(f, "unknown opcode 0x{op:02x}"),
            DecodeError::BadPayload(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<FieldError> for DecodeError {
    fn from(e: FieldError) -> Self {
        DecodeError::BadPayload(match e {
            FieldError::Short => "payload too short",
            FieldError::Utf8 => "invalid UTF-8",
            FieldError::Trailing => "bytes left over after the last field",
            FieldError::Length => "field has a length the protocol does not allow",
        })
    }
}

/// A message from client to server, borrowing from the frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMsg<'a> {
    /// Start a session, or resume one when `token` is present.
    Hello {
        /// Requested nick (ignored on resume).
        nick: &'a str,
        /// A resume token, or `None` for a new session.
        token: Option<SessionToken>,
    },
    /// Join a room.
    Join {
        /// Room name.
        room: &'a str,
    },
    /// Leave a room.
    Leave {
        /// Room name.
        room: &'a str,
    },
    /// Say something in a room.
    Say {
        /// Room name.
        room: &'a str,
        /// Message text.
        text: &'a str,
    },
    /// Private message.
    Whisper {
        /// Target nick.
        nick: &'a str,
        /// Message text.
        text: &'a str,
    },
    /// List a room's members.
    Who {
        /// Room name.
        room: &'a str,
    },
    /// Liveness probe.
    Ping {
        /// Opaque bytes echoed in the PONG.
        data: &'a [u8],
    },
    /// Answer to a server PING.
    Pong {
        /// The PING's bytes.
        data: &'a [u8],
    },
    /// End the session.
    Quit {
        /// Free text.
        reason: &'a str,
    },
    /// A room's kept messages, or (an empty room) the whispers held for the session while
    /// it was away.
    History(HistoryQuery<'a>),
}

/// The fields of a HISTORY request (PROTOCOL.md section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery<'a> {
    /// The room; empty for the whispers held for the session.
    pub room: &'a str,
    /// The server run `since` belongs to (a HISTORY_END's `epoch`); 0 if unknown.
    pub epoch: u64,
    /// Only messages with a msg_id above this (0: from the oldest kept).
    pub since: u64,
    /// Only messages with a msg_id below this (0: no bound).
    pub before: u64,
    /// At most this many: the newest of the range.
    pub limit: u32,
}

impl<'a> ClientMsg<'a> {
    /// Decodes a client frame's payload.
    ///
    /// ```
    /// use chatloop::protocol::{ClientMsg, split_frame};
    ///
    /// let mut wire = Vec::new();
    /// ClientMsg::Say { room: "lobby", text: "hi" }.encode(&mut wire);
    /// let frame = split_frame(&wire, 65_536).unwrap().expect("one whole frame");
    /// assert_eq!(
    ///     ClientMsg::decode(frame.opcode, frame.payload),
    ///     Ok(ClientMsg::Say { room: "lobby", text: "hi" })
    /// );
    /// ```
    pub fn decode(opcode: u8, payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let msg = match opcode {
            op::HELLO => {
                let nick = r.str()?;
                let token = match r.rest() {
                    [] => None,
                    t if t.len() == TOKEN_LEN => {
                        let mut tok = [0; TOKEN_LEN];
                        tok.copy_from_slice(t);
                        Some(tok)
                    }
                    _ => return Err(FieldError::Length.into()),
                };
                ClientMsg::Hello { nick, token }
            }
            op::JOIN => ClientMsg::Join { room: r.str()? },
            op::LEAVE => ClientMsg::Leave { room: r.str()? },
            op::SAY => ClientMsg::Say {
                room: r.str()?,
                text: r.rest_str()?,
            },
            op::WHISPER => ClientMsg::Whisper {
                nick: r.str()?,
                text: r.rest_str()?,
            },
            op::WHO => ClientMsg::Who { room: r.str()? },
            op::PING => ClientMsg::Ping { data: r.rest() },
            op::PONG => ClientMsg::Pong { data: r.rest() },
            op::QUIT => ClientMsg::Quit {
                reason: r.rest_str()?,
            },
            op::HISTORY => ClientMsg::History(HistoryQuery {
                room: r.str()?,
                epoch: r.u64()?,
                since: r.u64()?,
                before: r.u64()?,
                limit: r.u32()?,
            }),
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// The message's opcode.
    pub fn opcode(&self) -> u8 {
        match self {
            ClientMsg::Hello { .. } => op::HELLO,
            ClientMsg::Join { .. } => op::JOIN,
            ClientMsg::Leave { .. } => op::LEAVE,
            ClientMsg::Say { .. } => op::SAY,
            ClientMsg::Whisper { .. } => op::WHISPER,
            ClientMsg::Who { .. } => op::WHO,
            ClientMsg::Ping { .. } => op::PING,
            ClientMsg::Pong { .. } => op::PONG,
            ClientMsg::Quit { .. } => op::QUIT,
            ClientMsg::History(_) => op::HISTORY,
        }
    }

    /// Appends the whole frame, header included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = begin_frame(out, self.opcode());
        match *self {
            ClientMsg::Hello { nick, token } => {
                put_str(out, nick);
                if let Some(t) = token {
                    out.extend_from_slice(&t);
                }
            }
            ClientMsg::Join { room } | ClientMsg::Leave { room } | ClientMsg::Who { room } => {
                put_str(out, room)
            }
            ClientMsg::Say { room, text } => {
                put_str(out, room);
                out.extend_from_slice(text.as_bytes());
            }
            ClientMsg::Whisper { nick, text } => {
                put_str(out, nick);
                out.extend_from_slice(text.as_bytes());
            }
            ClientMsg::Ping { data } | ClientMsg::Pong { data } => out.extend_from_slice(data),
            ClientMsg::Quit { reason } => out.extend_from_slice(reason.as_bytes()),
            ClientMsg::History(q) => {
                put_str(out, q.room);
                put_u64(out, q.epoch);
                put_u64(out, q.since);
                put_u64(out, q.before);
                put_u32(out, q.limit);
            }
        }
        end_frame(out, start);
    }
}

/// The nicks of a ROSTER frame, validated at decode time and iterated without allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RosterNicks<'a> {
    count: u32,
    raw: &'a [u8],
}

impl<'a> RosterNicks<'a> {
    /// How many nicks the frame carries.
    pub fn count(&self) -> u32 {
        self.count
    }
}

impl<'a> Iterator for RosterNicks<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let mut r = Reader::new(self.raw);
        // Decode already validated every entry, so a failure here means the end.
        let s = r.str().ok()?;
        self.raw = r.rest();
        Some(s)
    }
}

/// A message from server to client, borrowing from the frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMsg<'a> {
    /// Session established.
    Welcome {
        /// This connection's id.
        conn_id: u64,
        /// Token with which a later connection may resume this session.
        token: SessionToken,
        /// Largest client payload the server accepts.
        max_frame: u32,
        /// The server's heartbeat interval in milliseconds.
        heartbeat_ms: u32,
        /// The session's nick.
        nick: &'a str,
    },
    /// A room message.
    Message {
        /// Server-wide increasing id.
        msg_id: u64,
        /// Room name.
        room: &'a str,
        /// Sender's nick.
        from: &'a str,
        /// Text.
        text: &'a str,
    },
    /// A private message.
    Whisper {
        /// Server-wide increasing id.
        msg_id: u64,
        /// Sender's nick.
        from: &'a str,
        /// Text.
        text: &'a str,
    },
    /// Membership change.
    Presence {
        /// What happened.
        kind: PresenceKind,
        /// Room name.
        room: &'a str,
        /// Whose membership changed.
        nick: &'a str,
    },
    /// (Part of) a room's member list.
    Roster {
        /// Room name.
        room: &'a str,
        /// More ROSTER frames for the same WHO follow.
        more: bool,
        /// The nicks in this frame.
        nicks: RosterNicks<'a>,
    },
    /// Liveness probe; answer with PONG carrying `data`.
    Ping {
        /// Opaque bytes.
        data: &'a [u8],
    },
    /// Answer to a client PING.
    Pong {
        /// The PING's bytes.
        data: &'a [u8],
    },
    /// An error.
    Error {
        /// Error code (see [`ErrorCode`]; unknown codes are kept as numbers).
        code: u16,
        /// The server closes the connection after this frame.
        fatal: bool,
        /// Human-readable text.
        detail: &'a str,
    },
    /// HISTORY (0x88): a room message from history, with MESSAGE's fields.
    History {
        /// Its msg_id, as first delivered.
        msg_id: u64,
        /// The room.
        room: &'a str,
        /// The sender's nick (empty: the server).
        from: &'a str,
        /// The text.
        text: &'a str,
    },
    /// HISTORY_WHISPER (0x89): a whisper held while the session was away, with WHISPER's
    /// fields.
    HistoryWhisper {
        /// Its msg_id.
        msg_id: u64,
        /// The sender's nick (empty: the server).
        from: &'a str,
        /// The text.
        text: &'a str,
    },
    /// HISTORY_END (0x8A): the end of a HISTORY answer.
    HistoryEnd {
        /// The room asked for (empty: whispers).
        room: &'a str,
        /// This server run's history epoch, for the next request's `epoch`.
        epoch: u64,
        /// How complete the answer is.
        status: HistoryStatus,
        /// HISTORY or HISTORY_WHISPER frames sent before it.
        count: u32,
    },
}

impl<'a> ServerMsg<'a> {
    /// Decodes a server frame's payload.
    pub fn decode(opcode: u8, payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let msg = match opcode {
            op::S_WELCOME => ServerMsg::Welcome {
                conn_id: r.u64()?,
                token: r.array()?,
                max_frame: r.u32()?,
                heartbeat_ms: r.u32()?,
                nick: r.str()?,
            },
            op::S_MESSAGE => ServerMsg::Message {
                msg_id: r.u64()?,
                room: r.str()?,
                from: r.str()?,
                text: r.rest_str()?,
            },
            op::S_WHISPER => ServerMsg::Whisper {
                msg_id: r.u64()?,
                from: r.str()?,
                text: r.rest_str()?,
            },
            op::S_PRESENCE => ServerMsg::Presence {
                kind: PresenceKind::from_u8(r.u8()?)
                    .ok_or(DecodeError::BadPayload("unknown presence kind"))?,
                room: r.str()?,
                nick: r.str()?,
            },
            op::S_ROSTER => {
                let room = r.str()?;
                let more = r.u8()? != 0;
                let count = r.u32()?;
                let raw = r.rest();
                let mut check = Reader::new(raw);
                for _ in 0..count {
                    check.str()?;
                }
                check.finish()?;
                ServerMsg::Roster {
                    room,
                    more,
                    nicks: RosterNicks { count, raw },
                }
            }
            op::S_HISTORY => ServerMsg::History {
                msg_id: r.u64()?,
                room: r.str()?,
                from: r.str()?,
                text: r.rest_str()?,
            },
            op::S_HISTORY_WHISPER => ServerMsg::HistoryWhisper {
                msg_id: r.u64()?,
                from: r.str()?,
                text: r.rest_str()?,
            },
            op::S_HISTORY_END => ServerMsg::HistoryEnd {
                room: r.str()?,
                epoch: r.u64()?,
                status: HistoryStatus::from_u8(r.u8()?)
                    .ok_or(DecodeError::BadPayload("unknown history status"))?,
                count: r.u32()?,
            },
            op::S_PING => ServerMsg::Ping { data: r.rest() },
            op::S_PONG => ServerMsg::Pong { data: r.rest() },
            op::S_ERROR => ServerMsg::Error {
                code: r.u16()?,
                fatal: r.u8()? != 0,
                detail: r.rest_str()?,
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the whole frame, header included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ServerMsg::Welcome {
                conn_id,
                token,
                max_frame,
                heartbeat_ms,
                nick,
            } => encode::welcome(out, conn_id, &token, max_frame, heartbeat_ms, nick),
            ServerMsg::Message {
                msg_id,
                room,
                from,
                text,
            } => encode::message(out, msg_id, room, from, text),
            ServerMsg::Whisper { msg_id, from, text } => encode::whisper(out, msg_id, from, text),
            ServerMsg::Presence { kind, room, nick } => encode::presence(out, kind, room, nick),
            ServerMsg::Roster { room, more, nicks } => {
                let start = encode::roster_begin(out, room);
                for n in nicks {
                    encode::roster_push(out, start, n);
                }
                encode::roster_end(out, start, more);
            }
            ServerMsg::Ping { data } => encode::ping(out, data),
            ServerMsg::Pong { data } => encode::pong(out, data),
            ServerMsg::Error {
                code,
                fatal,
                detail,
            } => encode::error_raw(out, code, fatal, detail),
            ServerMsg::History {
                msg_id,
                room,
                from,
                text,
            } => {
                let at = out.len();
                encode::message(out, msg_id, room, from, text);
                out[at + 3] = op::S_HISTORY;
            }
            ServerMsg::HistoryWhisper { msg_id, from, text } => {
                let at = out.len();
                encode::whisper(out, msg_id, from, text);
                out[at + 3] = op::S_HISTORY_WHISPER;
            }
            ServerMsg::HistoryEnd {
                room,
                epoch,
                status,
                count,
            } => encode::history_end(out, room, epoch, status, count),
        }
    }
}

/// Server frame encoders: each appends one whole frame to `out`.
///
/// These are what the chat core uses on its hot path; [`ServerMsg::encode`] is a thin typed
/// front end over them.
pub mod encode {
    use super::*;
    use crate::protocol::HEADER_LEN;
    use byteorder::{BigEndian, ByteOrder};

    /// WELCOME.
    pub fn welcome(
        out: &mut Vec<u8>,
        conn_id: u64,
        token: &SessionToken,
        max_frame: u32,
        heartbeat_ms: u32,
        nick: &str,
    ) {
        let s = begin_frame(out, op::S_WELCOME);
        put_u64(out, conn_id);
        out.extend_from_slice(token);
        put_u32(out, max_frame);
        put_u32(out, heartbeat_ms);
        put_str(out, nick);
        end_frame(out, s);
    }

    /// MESSAGE.
    pub fn message(out: &mut Vec<u8>, msg_id: u64, room: &str, from: &str, text: &str) {
        let s = begin_frame(out, op::S_MESSAGE);
        put_u64(out, msg_id);
        put_str(out, room);
        put_str(out, from);
        out.extend_from_slice(text.as_bytes());
        end_frame(out, s);
    }

    /// WHISPER.
    pub fn whisper(out: &mut Vec<u8>, msg_id: u64, from: &str, text: &str) {
        let s = begin_frame(out, op::S_WHISPER);
        put_u64(out, msg_id);
        put_str(out, from);
        out.extend_from_slice(text.as_bytes());
        end_frame(out, s);
    }

    /// PRESENCE.
    pub fn presence(out: &mut Vec<u8>, kind: PresenceKind, room: &str, nick: &str) {
        let s = begin_frame(out, op::S_PRESENCE);
        put_u8(out, kind as u8);
        put_str(out, room);
        put_str(out, nick);
        end_frame(out, s);
    }

    /// Bytes a ROSTER payload holds before its first nick, for a room name of `room_len` bytes.
    pub fn roster_overhead(room_len: usize) -> usize {
        2 + room_len + 1 + 4
    }

    /// Starts a ROSTER frame with no nicks; returns its start for `roster_push`/`roster_end`.
    pub fn roster_begin(out: &mut Vec<u8>, room: &str) -> usize {
        let s = begin_frame(out, op::S_ROSTER);
        put_str(out, room);
        put_u8(out, 0);
        put_u32(out, 0);
        s
    }

    /// Adds one nick to the ROSTER frame started at `start`.
    pub fn roster_push(out: &mut Vec<u8>, start: usize, nick: &str) {
        let room_len = BigEndian::read_u16(&out[start + HEADER_LEN..]) as usize;
        let count_at = start + HEADER_LEN + 2 + room_len + 1;
        let count = BigEndian::read_u32(&out[count_at..]) + 1;
        BigEndian::write_u32(&mut out[count_at..count_at + 4], count);
        put_str(out, nick);
    }

    /// Finishes the ROSTER frame started at `start`.
    pub fn roster_end(out: &mut [u8], start: usize, more: bool) {
        let room_len = BigEndian::read_u16(&out[start + HEADER_LEN..]) as usize;
        out[start + HEADER_LEN + 2 + room_len] = u8::from(more);
        end_frame(out, start);
    }

    /// PING (server to client).
    pub fn ping(out: &mut Vec<u8>, data: &[u8]) {
        let s = begin_frame(out, op::S_PING);
        out.extend_from_slice(data);
        end_frame(out, s);
    }

    /// PONG (server to client).
    pub fn pong(out: &mut Vec<u8>, data: &[u8]) {
        let s = begin_frame(out, op::S_PONG);
        out.extend_from_slice(data);
        end_frame(out, s);
    }

    /// ERROR with its fatal flag taken from the code.
    pub fn error(out: &mut Vec<u8>, code: ErrorCode, detail: &str) {
        error_raw(out, code.code(), code.is_fatal(), detail)
    }

    /// ERROR with any code and flag.
    pub fn error_raw(out: &mut Vec<u8>, code: u16, fatal: bool, detail: &str) {
        let s = begin_frame(out, op::S_ERROR);
        put_u16(out, code);
        put_u8(out, u8::from(fatal));
        out.extend_from_slice(detail.as_bytes());
        end_frame(out, s);
    }

    /// HISTORY_END: the end of a HISTORY answer.
    pub fn history_end(
        out: &mut Vec<u8>,
        room: &str,
        epoch: u64,
        status: HistoryStatus,
        count: u32,
    ) {
        let s = begin_frame(out, op::S_HISTORY_END);
        put_str(out, room);
        put_u64(out, epoch);
        put_u8(out, status as u8);
        put_u32(out, count);
        end_frame(out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{HEADER_LEN, split_frame};

    fn roundtrip_client(m: ClientMsg<'_>) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let f = split_frame(&out, u32::MAX).unwrap().unwrap();
        assert_eq!(f.frame_len(), out.len());
        assert_eq!(ClientMsg::decode(f.opcode, f.payload), Ok(m));
    }

    fn roundtrip_server(m: ServerMsg<'_>) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let f = split_frame(&out, u32::MAX).unwrap().unwrap();
        assert_eq!(f.frame_len(), out.len());
        assert_eq!(ServerMsg::decode(f.opcode, f.payload), Ok(m));
    }

    #[test]
    fn every_client_message_round_trips() {
        roundtrip_client(ClientMsg::Hello {
            nick: "alice",
            token: None,
        });
        roundtrip_client(ClientMsg::Hello {
            nick: "alice",
            token: Some([7; 16]),
        });
        roundtrip_client(ClientMsg::Join { room: "lobby" });
        roundtrip_client(ClientMsg::Leave { room: "lobby" });
        roundtrip_client(ClientMsg::Say {
            room: "lobby",
            text: "hi there",
        });
        roundtrip_client(ClientMsg::Say {
            room: "lobby",
            text: "",
        });
        roundtrip_client(ClientMsg::Whisper {
            nick: "bob",
            text: "psst",
        });
        roundtrip_client(ClientMsg::Who { room: "lobby" });
        roundtrip_client(ClientMsg::Ping { data: &[0, 255, 1] });
        roundtrip_client(ClientMsg::Pong { data: &[] });
        roundtrip_client(ClientMsg::Quit { reason: "bye" });
    }

    #[test]
    fn every_server_message_round_trips() {
        roundtrip_server(ServerMsg::Welcome {
            conn_id: 1 << 32 | 5,
            token: [9; 16],
            max_frame: 65536,
            heartbeat_ms: 30_000,
            nick: "alice",
        });
        roundtrip_server(ServerMsg::Message {
            msg_id: 42,
            room: "lobby",
            from: "alice",
            text: "hello",
        });
        roundtrip_server(ServerMsg::Whisper {
            msg_id: 43,
            from: "bob",
            text: "",
        });
        for kind in [
            PresenceKind::Join,
            PresenceKind::Leave,
            PresenceKind::Quit,
            PresenceKind::Gone,
        ] {
            roundtrip_server(ServerMsg::Presence {
                kind,
                room: "r",
                nick: "n",
            });
        }
        roundtrip_server(ServerMsg::Ping { data: b"12345678" });
        roundtrip_server(ServerMsg::Pong { data: b"" });
        roundtrip_server(ServerMsg::Error {
            code: 9,
            fatal: false,
            detail: "nick is taken",
        });
    }

    #[test]
    fn roster_encodes_count_and_more() {
        let mut out = Vec::new();
        let s = encode::roster_begin(&mut out, "lobby");
        for n in ["a", "bb", "ccc"] {
            encode::roster_push(&mut out, s, n);
        }
        encode::roster_end(&mut out, s, true);
        let f = split_frame(&out, u32::MAX).unwrap().unwrap();
        let (op, payload) = (f.opcode, f.payload);
        match ServerMsg::decode(op, payload).unwrap() {
            ServerMsg::Roster { room, more, nicks } => {
                assert_eq!(room, "lobby");
                assert!(more);
                assert_eq!(nicks.count(), 3);
                assert_eq!(nicks.collect::<Vec<_>>(), ["a", "bb", "ccc"]);
            }
            other => panic!("not a roster: {other:?}"),
        }
        assert_eq!(
            payload.len(),
            encode::roster_overhead(5) + 3 * 2 + 1 + 2 + 3
        );
        // And through the typed front end.
        let m = ServerMsg::decode(op, payload).unwrap();
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(again, out);
    }

    #[test]
    fn hello_encodes_as_the_spec_example() {
        let mut out = Vec::new();
        ClientMsg::Hello {
            nick: "alice",
            token: None,
        }
        .encode(&mut out);
        assert_eq!(
            out,
            [
                0x43, 0x4C, 0x01, 0x01, 0, 0, 0, 7, 0, 5, b'a', b'l', b'i', b'c', b'e'
            ]
        );
        assert_eq!(out.len(), HEADER_LEN + 7);
    }

    #[test]
    fn malformed_client_payloads() {
        use DecodeError::*;
        let bad = |op, p: &[u8]| ClientMsg::decode(op, p).unwrap_err();
        assert!(matches!(bad(op::JOIN, &[]), BadPayload(_)));
        assert!(matches!(bad(op::JOIN, &[0]), BadPayload(_)));
        assert!(matches!(bad(op::JOIN, &[0, 3, b'a']), BadPayload(_)));
        assert_eq!(
            bad(op::JOIN, &[0, 1, b'a', b'x']),
            BadPayload("bytes left over after the last field")
        );
        assert_eq!(bad(op::JOIN, &[0, 1, 0xFF]), BadPayload("invalid UTF-8"));
        assert_eq!(
            bad(op::SAY, &[0, 1, b'a', 0xC3]),
            BadPayload("invalid UTF-8")
        );
        assert_eq!(bad(op::QUIT, &[0xFF]), BadPayload("invalid UTF-8"));
        assert!(matches!(
            bad(op::HELLO, &[0, 1, b'a', 1, 2, 3, 4, 5]),
            BadPayload(_)
        ));
        assert!(matches!(
            bad(
                op::HELLO,
                &[
                    0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
                ]
            ),
            BadPayload(_)
        ));
        assert!(matches!(bad(op::WHISPER, &[0, 2, b'a']), BadPayload(_)));
        assert!(matches!(bad(op::WHO, &[0, 0, 0]), BadPayload(_)));
        assert_eq!(bad(0x00, &[]), UnknownOpcode(0));
        assert_eq!(bad(0x0B, &[]), UnknownOpcode(0x0B));
        assert_eq!(bad(op::S_WELCOME, &[]), UnknownOpcode(0x81));
        // PING and PONG data is opaque: anything goes.
        assert_eq!(
            ClientMsg::decode(op::PING, &[0xFF, 0]),
            Ok(ClientMsg::Ping { data: &[0xFF, 0] })
        );
    }

    #[test]
    fn malformed_server_payloads() {
        assert!(ServerMsg::decode(op::S_PRESENCE, &[9, 0, 1, b'r', 0, 1, b'n']).is_err());
        assert!(ServerMsg::decode(op::S_ROSTER, &[0, 1, b'r', 0, 0, 0, 0, 2, 0, 1, b'a']).is_err());
        assert!(ServerMsg::decode(op::S_WELCOME, &[0; 10]).is_err());
        assert!(ServerMsg::decode(op::HELLO, &[]).is_err());
    }
}
