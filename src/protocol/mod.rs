//! Wire protocol v1: frame header, opcodes, error codes, typed messages.
//!
//! Everything here is pure: bytes in, values out, and values in, bytes appended to a caller's
//! `Vec<u8>` out. Nothing touches a socket or a clock. `docs/PROTOCOL.md` is the normative text;
//! this module is its executable form.
//!
//! Every frame, in both directions:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | magic `0x43 0x4C` ("CL") |
//! | 2 | 1 | version, 1 |
//! | 3 | 1 | opcode |
//! | 4 | 4 | payload length N, u32 big-endian |
//! | 8 | N | payload |

mod deframer;
mod frame;
mod message;
mod wire;

pub use deframer::Deframer;
pub use frame::{FrameError, Header, RawFrame, check_header, split_frame};
pub use message::{ClientMsg, DecodeError, HistoryQuery, RosterNicks, ServerMsg, encode};

/// The two magic bytes that open every frame: ASCII "CL".
pub const MAGIC: [u8; 2] = [0x43, 0x4C];
/// The only protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Bytes in a frame header: magic (2), version (1), opcode (1), length (4).
pub const HEADER_LEN: usize = 8;
/// Bytes in a session token.
pub const TOKEN_LEN: usize = 16;
/// A server payload may exceed the client limit `max_frame` by at most this many bytes
/// (room for msg_id, room and nick around a client's text).
pub const SERVER_SLACK: u32 = 128;
/// Longest nick, in bytes.
pub const MAX_NICK: usize = 32;
/// Longest room name, in bytes.
pub const MAX_ROOM: usize = 64;

/// A session token: 16 bytes from the OS's random source.
pub type SessionToken = [u8; TOKEN_LEN];

/// Opcodes, client to server (`0x01..=0x0A`) and server to client (`0x81..=0x8A`, `0x8F`).
pub mod op {
    /// Client: start or resume a session.
    pub const HELLO: u8 = 0x01;
    /// Client: join a room.
    pub const JOIN: u8 = 0x02;
    /// Client: leave a room.
    pub const LEAVE: u8 = 0x03;
    /// Client: say something in a room.
    pub const SAY: u8 = 0x04;
    /// Client: private message to one nick.
    pub const WHISPER: u8 = 0x05;
    /// Client: list a room's members.
    pub const WHO: u8 = 0x06;
    /// Client: liveness probe; answered with PONG.
    pub const PING: u8 = 0x07;
    /// Client: answer to a server PING.
    pub const PONG: u8 = 0x08;
    /// Client: end the session.
    pub const QUIT: u8 = 0x09;
    /// Client: ask for a room's kept messages, or the whispers held for the session
    /// (an extension of v1, docs/PROTOCOL.md section 12).
    pub const HISTORY: u8 = 0x0A;
    /// The highest client opcode the server serves.
    pub const LAST_CLIENT: u8 = HISTORY;
    /// Server: session established.
    pub const S_WELCOME: u8 = 0x81;
    /// Server: a room message.
    pub const S_MESSAGE: u8 = 0x82;
    /// Server: a private message.
    pub const S_WHISPER: u8 = 0x83;
    /// Server: someone joined, left, quit or is gone.
    pub const S_PRESENCE: u8 = 0x84;
    /// Server: (part of) a room's member list.
    pub const S_ROSTER: u8 = 0x85;
    /// Server: liveness probe; answer with PONG.
    pub const S_PING: u8 = 0x86;
    /// Server: answer to a client PING.
    pub const S_PONG: u8 = 0x87;
    /// Server: a room message from history (MESSAGE's layout), answering HISTORY.
    pub const S_HISTORY: u8 = 0x88;
    /// Server: a whisper held while the session was away (WHISPER's layout), answering
    /// HISTORY.
    pub const S_HISTORY_WHISPER: u8 = 0x89;
    /// Server: the end of a HISTORY answer.
    pub const S_HISTORY_END: u8 = 0x8A;
    /// Server: an error, fatal or not.
    pub const S_ERROR: u8 = 0x8F;
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $text:literal, $fatal:literal;)*) => {
        /// Protocol error codes carried by the ERROR frame.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode {
            $($(#[$doc])* $name = $code,)*
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code's wire value.
            pub fn code(self) -> u16 {
                self as u16
            }

            /// The code's name as written in docs/PROTOCOL.md (`bad_magic`, ...).
            pub fn name(self) -> &'static str {
                match self { $(ErrorCode::$name => $text,)* }
            }

            /// Whether the server closes the connection right after sending this error.
            pub fn is_fatal(self) -> bool {
                match self { $(ErrorCode::$name => $fatal,)* }
            }

            /// The code for a wire value, if it is one.
            pub fn from_u16(v: u16) -> Option<ErrorCode> {
                match v { $($code => Some(ErrorCode::$name),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// The first two bytes of a frame were not "CL".
    BadMagic = 1, "bad_magic", true;
    /// The version byte was not 1.
    UnsupportedVersion = 2, "unsupported_version", true;
    /// The header announced a payload longer than max_frame.
    FrameTooLarge = 3, "frame_too_large", true;
    /// The opcode is not a client opcode.
    UnknownOpcode = 4, "unknown_opcode", false;
    /// The payload is too short, too long or holds invalid UTF-8.
    BadPayload = 5, "bad_payload", false;
    /// Only HELLO, PING and QUIT are served before WELCOME.
    HelloRequired = 6, "hello_required", false;
    /// A second HELLO on a welcomed connection.
    AlreadyWelcomed = 7, "already_welcomed", false;
    /// The nick breaks the nick rules.
    BadNick = 8, "bad_nick", false;
    /// Another session holds this nick (ASCII case folded).
    NickTaken = 9, "nick_taken", false;
    /// The room name breaks the room rules.
    BadRoom = 10, "bad_room", false;
    /// SAY or LEAVE on a room the sender is not in.
    NotInRoom = 11, "not_in_room", false;
    /// JOIN of a room the sender is already in.
    AlreadyInRoom = 12, "already_in_room", false;
    /// WHISPER to a nick nobody holds.
    NoSuchUser = 13, "no_such_user", false;
    /// The server is at its connection limit.
    ServerFull = 14, "server_full", true;
    /// The connection's queued output exceeded max-pending.
    SlowConsumer = 15, "slow_consumer", true;
    /// Nothing was received for idle-timeout.
    IdleTimeout = 16, "idle_timeout", true;
    /// No HELLO within hello-timeout of the accept.
    HelloTimeout = 17, "hello_timeout", true;
    /// Another connection resumed this session.
    SessionTakenOver = 18, "session_taken_over", true;
    /// The server is shutting down.
    ShuttingDown = 19, "shutting_down", true;
    /// JOIN beyond max-rooms-per-conn.
    TooManyRooms = 20, "too_many_rooms", false;
    /// The operator (or an embedding application) closed this connection.
    Kicked = 21, "kicked", true;
    /// A policy of the embedding application refused the command (a HELLO, SAY or WHISPER);
    /// nothing was delivered and no msg_id was used.
    Refused = 22, "refused", false;
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How complete a HISTORY answer is: the `status` byte of HISTORY_END (PROTOCOL.md 12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HistoryStatus {
    /// Every message of the asked range was sent.
    Complete = 0,
    /// The answer was cut (by its limit or its size): older messages of the range are kept;
    /// ask again with `before` = the oldest msg_id received.
    More = 1,
    /// Some messages of the range are no longer kept (evicted, or from another server run):
    /// every kept one up to the newest was sent.
    Gap = 2,
}

impl HistoryStatus {
    /// The status for a wire value, if it is one.
    pub fn from_u8(v: u8) -> Option<HistoryStatus> {
        match v {
            0 => Some(HistoryStatus::Complete),
            1 => Some(HistoryStatus::More),
            2 => Some(HistoryStatus::Gap),
            _ => None,
        }
    }
}

/// The kind byte of a PRESENCE frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PresenceKind {
    /// The member joined the room.
    Join = 1,
    /// The member left the room with LEAVE.
    Leave = 2,
    /// The member ended its session with QUIT.
    Quit = 3,
    /// The member's connection closed for any other reason.
    Gone = 4,
}

impl PresenceKind {
    /// The kind for a wire value, if it is one.
    pub fn from_u8(v: u8) -> Option<PresenceKind> {
        match v {
            1 => Some(PresenceKind::Join),
            2 => Some(PresenceKind::Leave),
            3 => Some(PresenceKind::Quit),
            4 => Some(PresenceKind::Gone),
            _ => None,
        }
    }
}

/// Whether `s` is a valid nick (1 to 32 bytes, no control characters, no white space, no
/// format characters).
pub fn valid_nick(s: &str) -> bool {
    valid_name(s, MAX_NICK)
}

/// Whether `s` is a valid room name (1 to 64 bytes, no control characters, no white space, no
/// format characters).
pub fn valid_room(s: &str) -> bool {
    valid_name(s, MAX_ROOM)
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| !(c.is_control() || c.is_whitespace() || is_format(c)))
}

/// Unicode's format characters (General_Category Cf, Unicode 15.1): invisible code points
/// that change how text around them is shown (U+200B ZERO WIDTH SPACE, U+202E RIGHT-TO-LEFT
/// OVERRIDE, U+2060 WORD JOINER, U+FEFF, tags, ...). In a name they make two names look
/// alike, or reorder what follows them on screen; in free text they are harmless and allowed.
/// The table is short and stable (Cf gains a code point every few Unicode versions), so it
/// is spelled out here rather than pulled in with a Unicode property crate.
pub fn is_format(c: char) -> bool {
    const CF: &[(u32, u32)] = &[
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];
    let c = c as u32;
    // Everything below U+00AD is plain: the common case costs one comparison.
    c >= 0xAD
        && CF
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_and_fatality() {
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c.code()), Some(c));
        }
        let fatal: Vec<u16> = ErrorCode::ALL
            .iter()
            .filter(|c| c.is_fatal())
            .map(|c| c.code())
            .collect();
        assert_eq!(fatal, vec![1, 2, 3, 14, 15, 16, 17, 18, 19, 21]);
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(22), Some(ErrorCode::Refused));
        assert!(!ErrorCode::Refused.is_fatal());
        assert_eq!(ErrorCode::from_u16(23), None);
    }

    #[test]
    fn name_rules() {
        assert!(valid_nick("alice"));
        assert!(valid_nick("Ünïcødé"));
        assert!(valid_nick(&"a".repeat(32)));
        assert!(!valid_nick(&"a".repeat(33)));
        assert!(!valid_nick(""));
        assert!(!valid_nick("a b"));
        assert!(!valid_nick("a\u{a0}b"));
        assert!(!valid_nick("a\u{2003}b"));
        // Format characters: names that render like another, or reorder text.
        for c in [
            '\u{AD}', '\u{200B}', '\u{200D}', '\u{200F}', '\u{202E}', '\u{2060}', '\u{2064}',
        ]
        .into_iter()
        .chain([
            '\u{FEFF}',
            '\u{E0001}',
            '\u{E007F}',
            '\u{110BD}',
            '\u{1D173}',
        ]) {
            assert!(is_format(c), "{:04X}", c as u32);
            assert!(!valid_nick(&format!("hon_alice{c}")), "{:04X}", c as u32);
            assert!(!valid_room(&format!("r{c}")), "{:04X}", c as u32);
        }
        // Combining marks and other scripts stay allowed.
        assert!(valid_nick("e\u{301}mile"));
        assert!(valid_nick("\u{5D0}\u{5D1}"));
        assert!(valid_room("\u{627}\u{644}"));
        for c in [
            'a',
            '\u{AC}',
            '\u{AE}',
            '\u{2010}',
            '\u{2065}',
            '\u{FFFC}',
            '\u{E0000}',
            '\u{E0080}',
        ] {
            assert!(!is_format(c), "{:04X}", c as u32);
        }
        assert!(!valid_nick("a\u{7f}"));
        // C1 controls: U+009B is CSI to a terminal that honours 8-bit controls.
        assert!(!valid_nick("a\u{9b}31m"));
        assert!(!valid_room("r\u{80}"));
        assert!(!valid_room("r\u{9f}"));
        assert!(valid_nick("a\u{a1}"));
        assert!(!valid_nick("a\tb"));
        assert!(valid_room(&"r".repeat(64)));
        assert!(!valid_room(&"r".repeat(65)));
        // 32 bytes, not 32 characters.
        assert!(!valid_nick(&"é".repeat(17)));
    }
}
