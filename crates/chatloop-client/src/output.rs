//! What event lines say and where they go: the text of the session's [`Line`]s, and a printer
//! shared by the network thread and the input thread.
//!
//! Interactive sessions print through rustyline's `ExternalPrinter`, which clears the input
//! line, prints, and redraws the prompt with what was typed so far; scripted sessions print to
//! stdout. Every event line starts with a `HH:MM:SS` timestamp.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use chatloop::protocol::{ErrorCode, HistoryStatus, PresenceKind};
use time::{OffsetDateTime, UtcOffset};

use super::session::Line;

/// Wall clock for timestamps.
///
/// The local UTC offset is read once, at startup, while the process is still single-threaded:
/// the `time` crate refuses to read it later on Unix (reading the time zone concurrently with
/// `setenv` is unsound), so a DST change during a session is not followed. When the offset
/// cannot be read, timestamps are UTC and end in `Z`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset: UtcOffset,
    local: bool,
}

impl Clock {
    /// Reads the local offset; call before spawning threads.
    pub fn new() -> Clock {
        match UtcOffset::current_local_offset() {
            Ok(offset) => Clock {
                offset,
                local: true,
            },
            Err(_) => Clock {
                offset: UtcOffset::UTC,
                local: false,
            },
        }
    }

    /// `HH:MM:SS` now (`HH:MM:SSZ` when the local offset is unknown).
    pub fn stamp(&self) -> String {
        let t = OffsetDateTime::now_utc().to_offset(self.offset);
        format!(
            "{:02}:{:02}:{:02}{}",
            t.hour(),
            t.minute(),
            t.second(),
            if self.local { "" } else { "Z" }
        )
    }
}

/// Something that prints whole lines.
pub trait LineSink: Send {
    /// Prints `line`, which ends with a newline.
    fn print_line(&mut self, line: String) -> io::Result<()>;
}

/// Plain stdout (scripted mode, or after the line editor is gone).
struct Stdout;

impl LineSink for Stdout {
    fn print_line(&mut self, line: String) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(line.as_bytes())?;
        out.flush()
    }
}

/// rustyline's external printer: prints above the line being edited.
pub struct EditorSink<P>(pub P);

impl<P: rustyline::ExternalPrinter + Send> LineSink for EditorSink<P> {
    fn print_line(&mut self, line: String) -> io::Result<()> {
        self.0.print(line).map_err(io::Error::other)
    }
}

/// The shared printer. Cloning shares the sink.
#[derive(Clone)]
pub struct Out {
    sink: Arc<Mutex<Box<dyn LineSink>>>,
    clock: Clock,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out").field("clock", &self.clock).finish()
    }
}

impl Out {
    /// A printer to stdout.
    pub fn stdout(clock: Clock) -> Out {
        Out {
            sink: Arc::new(Mutex::new(Box::new(Stdout))),
            clock,
        }
    }

    /// Prints through `sink` from now on.
    pub fn set_sink(&self, sink: Box<dyn LineSink>) {
        *self.lock() = sink;
    }

    /// Prints to stdout from now on (the line editor is gone).
    pub fn use_stdout(&self) {
        self.set_sink(Box::new(Stdout));
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn LineSink>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One event line: timestamp, space, `text`.
    pub fn event(&self, text: &str) {
        self.line(format!("{} {text}\n", self.clock.stamp()));
    }

    /// One line of the session's.
    pub fn show(&self, line: &Line) {
        self.event(&line.to_string());
    }

    /// Text without a timestamp (help).
    pub fn plain(&self, text: &str) {
        let mut s = text.to_string();
        if !s.ends_with('\n') {
            s.push('\n');
        }
        self.line(s);
    }

    fn line(&self, s: String) {
        // A closed stdout (the reader of a pipe went away) is not worth dying for.
        let _ = self.lock().print_line(s);
    }
}

/// An error code by its protocol name (`error_999` for a code this client does not know).
pub fn error_name(code: u16) -> Cow<'static, str> {
    match ErrorCode::from_u16(code) {
        Some(c) => Cow::Borrowed(c.name()),
        None => Cow::Owned(format!("error_{code}")),
    }
}

/// The text of a line, without its timestamp. Whatever came from the network goes through
/// [`clean`].
impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Connected {
                addr,
                nick,
                conn_id,
            } => write!(
                f,
                "* connected to {addr} as {} (conn {conn_id:#x})",
                clean(nick)
            ),
            Line::Token(token) => {
                f.write_str("* token ")?;
                token.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            Line::Reconnected { nick } => write!(f, "* reconnected as {}", clean(nick)),
            Line::Resumed => f.write_str("* session resumed"),
            Line::AttemptFailed(why) => write!(f, "* {why}"),
            Line::ConnectionLost(why) => write!(f, "* connection lost: {why}"),
            Line::Retrying {
                reconnect,
                delay,
                attempt,
            } => write!(
                f,
                "* {} in {}ms (attempt {attempt})",
                if *reconnect {
                    "reconnecting"
                } else {
                    "connecting"
                },
                delay.as_millis()
            ),
            Line::Unreachable { attempts } => write!(
                f,
                "! unreachable: giving up after {attempts} attempt{}",
                if *attempts == 1 { "" } else { "s" }
            ),
            Line::NotReconnecting { code } => {
                write!(f, "* not reconnecting after {}", error_name(*code))
            }
            // The reason may quote the server's certificate.
            Line::Rejected(why) => write!(f, "! {}; not retrying", clean(why)),
            Line::Error { code, detail } if detail.is_empty() => {
                write!(f, "! {}", error_name(*code))
            }
            Line::Error { code, detail } => {
                write!(f, "! {}: {}", error_name(*code), clean(detail))
            }
            Line::RejoinRefused { code, room, detail } => write!(
                f,
                "! {}: cannot rejoin {}: {}",
                error_name(*code),
                clean(room),
                clean(detail)
            ),
            Line::BadFrame { op, why } => write!(f, "! bad_frame: opcode {op:#04x}: {why}"),
            Line::TooLong { payload, max } => write!(
                f,
                "! too_long: {payload} bytes, the server accepts at most {max}; not sent"
            ),
            Line::NotJoined(room) => {
                write!(f, "! not_in_room: not in {} (/join it first)", clean(room))
            }
            Line::NoRoom { who: false } => {
                f.write_str("! no_room: no current room; /join ROOM first")
            }
            Line::NoRoom { who: true } => f.write_str("! no_room: no current room; use /who ROOM"),
            Line::Current(Some(room)) => write!(f, "* current room: {}", clean(room)),
            Line::Current(None) => f.write_str("* no current room"),
            Line::Message { room, from, text } => write!(
                f,
                "[{}] <{}> {}",
                clean(room),
                clean(server_if_empty(from)),
                clean(text)
            ),
            Line::Whisper { from, text } => {
                write!(f, "*{}* {}", clean(server_if_empty(from)), clean(text))
            }
            Line::WhisperSent { nick, text } => write!(f, "-> *{}* {}", clean(nick), clean(text)),
            Line::Presence { kind, room, nick } => {
                let verb = match kind {
                    PresenceKind::Join => "joined",
                    PresenceKind::Leave => "left",
                    PresenceKind::Quit => "quit",
                    PresenceKind::Gone => "gone from",
                };
                write!(f, "* {} {verb} {}", clean(nick), clean(room))
            }
            Line::Roster { room, nicks } => {
                write!(f, "[{}] ", clean(room))?;
                match nicks.len() {
                    0 => return f.write_str("no members"),
                    1 => f.write_str("1 member: ")?,
                    n => write!(f, "{n} members: ")?,
                }
                for (i, n) in nicks.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(&clean(n))?;
                }
                Ok(())
            }
            // The marker comes first, so that a replayed line still contains what the live
            // one would have said (`[lobby] <bob> hi`).
            Line::Replayed { scrollback, line } => write!(
                f,
                "{} {line}",
                if *scrollback { "(history)" } else { "(missed)" }
            ),
            Line::Recovered {
                room,
                count,
                status,
            } => recovered(f, room, *count, *status),
            Line::NewSession { room } => write!(
                f,
                "* new session: messages in {} while disconnected may have been missed",
                clean(room)
            ),
            Line::Scrollback {
                room,
                count,
                status,
            } => {
                let room = clean(room);
                let n = messages(*count);
                match status {
                    HistoryStatus::Complete if *count == 0 => {
                        write!(f, "* history of {room}: no messages kept")
                    }
                    HistoryStatus::Complete => write!(f, "* history of {room}: {n}, nothing older"),
                    HistoryStatus::More => {
                        write!(f, "* history of {room}: the last {n}; older ones are kept")
                    }
                    HistoryStatus::Gap => {
                        write!(f, "* history of {room}: {n}; older ones were lost")
                    }
                }
            }
            Line::NoHistory => f.write_str("! no_history: this server keeps no history"),
        }
    }
}

/// `1 message`, `12 messages`.
fn messages(n: usize) -> String {
    format!("{n} message{}", if n == 1 { "" } else { "s" })
}

/// The line that ends a recovery (an empty room: the held whispers).
fn recovered(
    f: &mut fmt::Formatter<'_>,
    room: &str,
    n: usize,
    status: HistoryStatus,
) -> fmt::Result {
    let (what, whats) = if room.is_empty() {
        (
            "whispers".to_string(),
            format!("{n} whisper{}", if n == 1 { "" } else { "s" }),
        )
    } else {
        (format!("messages in {}", clean(room)), messages(n))
    };
    match status {
        HistoryStatus::Complete if n == 0 => write!(f, "* nothing missed in {}", clean(room)),
        HistoryStatus::Complete if room.is_empty() => write!(f, "* recovered {whats}"),
        HistoryStatus::Complete => write!(f, "* recovered {whats} in {}", clean(room)),
        HistoryStatus::More => write!(f, "* recovered {whats}; older {what} were left out"),
        HistoryStatus::Gap if n == 0 => write!(f, "* some {what} were lost (history exhausted)"),
        HistoryStatus::Gap => write!(
            f,
            "* some {what} were lost (history exhausted); {n} recovered"
        ),
    }
}

/// An empty sender is the server itself (an embedding application's announcement).
fn server_if_empty(from: &str) -> &str {
    if from.is_empty() { "(server)" } else { from }
}

/// Makes text from the network safe to print on one terminal line: control characters
/// (C0, DEL and C1, which include ESC and the line breaks) become U+FFFD, tabs a space. A
/// peer therefore cannot forge extra lines or send terminal escape sequences.
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control()) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| match c {
                '\t' => ' ',
                c if c.is_control() => '\u{FFFD}',
                c => c,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_keeps_text_and_neutralises_controls() {
        assert_eq!(clean("héllo wörld"), "héllo wörld");
        assert_eq!(
            clean("a\nb\x1b[31mc\td\u{85}"),
            "a\u{FFFD}b\u{FFFD}[31mc d\u{FFFD}"
        );
    }

    #[test]
    fn lines_read_as_the_readme_says_and_network_text_is_cleaned() {
        use std::time::Duration;
        let s = |l: Line| l.to_string();
        assert_eq!(
            s(Line::Roster {
                room: "a".into(),
                nicks: vec!["bob".into()]
            }),
            "[a] 1 member: bob"
        );
        assert_eq!(
            s(Line::Unreachable { attempts: 1 }),
            "! unreachable: giving up after 1 attempt"
        );
        assert_eq!(
            s(Line::Presence {
                kind: PresenceKind::Quit,
                room: "lobby".into(),
                nick: "bob".into()
            }),
            "* bob quit lobby"
        );
        assert_eq!(
            s(Line::Whisper {
                from: String::new(),
                text: "hi".into()
            }),
            "*(server)* hi"
        );
        assert_eq!(
            s(Line::Retrying {
                reconnect: false,
                delay: Duration::from_millis(180),
                attempt: 2
            }),
            "* connecting in 180ms (attempt 2)"
        );
        assert_eq!(
            s(Line::Error {
                code: 22,
                detail: "no\nspam".into()
            }),
            "! refused: no\u{FFFD}spam"
        );
        assert_eq!(
            s(Line::RejoinRefused {
                code: 999,
                room: "r\x1b".into(),
                detail: String::new()
            }),
            "! error_999: cannot rejoin r\u{FFFD}: "
        );
        assert_eq!(
            s(Line::Connected {
                addr: "h:1".into(),
                nick: "a\tb".into(),
                conn_id: 255
            }),
            "* connected to h:1 as a b (conn 0xff)"
        );
        assert_eq!(
            s(Line::Rejected(
                "cannot connect to h:1: TLS: certificate not valid for name \"h\"; certificate \
                 is only valid for x\ny"
                    .into()
            )),
            "! cannot connect to h:1: TLS: certificate not valid for name \"h\"; certificate \
             is only valid for x\u{FFFD}y; not retrying"
        );
    }

    #[test]
    fn stamp_is_hh_mm_ss() {
        let s = Clock::new().stamp();
        let t = s.trim_end_matches('Z');
        assert_eq!(t.len(), 8, "{s}");
        assert_eq!(t.as_bytes()[2], b':');
        assert_eq!(t.as_bytes()[5], b':');
    }
}
