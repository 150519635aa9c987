//! Peer-supplied text, made safe to write into a log.
//!
//! A nick, a room, a QUIT reason, an ERROR detail that echoes a client, an HTTP path: anything
//! a peer chose may hold a newline (which would forge whole log lines, say a fake
//! `[ERROR] poll failed`), terminal escape sequences (which act on the operator's terminal),
//! or invisible format characters, and may be long. [`Untrusted`] displays such text with every
//! control, format and other non-printing character written as an escape (`\n`, `\u{1b}`,
//! `\u{202e}`), with quotes and backslashes escaped so the result reads unambiguously, and cut
//! after [`MAX_CHARS`] characters with the total length said. It costs nothing unless the log
//! line is actually written (`log` formats lazily).

use std::fmt::{self, Write};

/// Characters of untrusted text shown in a log line; the rest is summarised.
pub const MAX_CHARS: usize = 80;

/// Displays peer-supplied text escaped, in double quotes. See the [module docs](self).
///
/// ```
/// use chatloop::untrusted::Untrusted;
///
/// let reason = "bye\n2026-12-04T00:00:00Z [ERROR] poll failed\u{1b}[2J";
/// let line = format!("quit ({})", Untrusted(reason));
/// assert_eq!(line, r#"quit ("bye\n2026-12-04T00:00:00Z [ERROR] poll failed\u{1b}[2J")"#);
/// assert!(!line.contains('\n'));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

/// Whether `c` is shown as itself: printable, and neither a quote nor a backslash.
fn plain(c: char) -> bool {
    !(c.is_control()
        || c == '"'
        || c == '\\'
        || crate::protocol::is_format(c)
        // Line and paragraph separators, and the other invisible whitespace, read as breaks.
        || (c.is_whitespace() && c != ' ')
        // Private use and unassigned planes: nothing a terminal shows meaningfully.
        || matches!(c as u32, 0xE000..=0xF8FF | 0xF0000..=0x10FFFF | 0xFFF0..=0xFFFF))
}

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for (shown, c) in self.0.chars().enumerate() {
            if shown == MAX_CHARS {
                f.write_char('"')?;
                return write!(f, "... ({} bytes in all)", self.0.len());
            }
            match c {
                c if plain(c) => f.write_char(c)?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "\\u{{{:x}}}", c as u32)?,
            }
        }
        f.write_char('"')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_a_line_or_act_on_a_terminal() {
        let shown = |s: &str| Untrusted(s).to_string();
        assert_eq!(shown("alice"), "\"alice\"");
        assert_eq!(shown("日本語 émile 🦀"), "\"日本語 émile 🦀\"");
        assert_eq!(shown("a\nb\r\tc"), r#""a\nb\r\tc""#);
        assert_eq!(shown("\u{1b}[31mred"), r#""\u{1b}[31mred""#);
        assert_eq!(shown("\u{9b}2J"), r#""\u{9b}2J""#, "C1 CSI");
        assert_eq!(shown("x\u{202e}y\u{200b}"), r#""x\u{202e}y\u{200b}""#);
        assert_eq!(shown("a\u{2028}b\u{85}"), r#""a\u{2028}b\u{85}""#);
        assert_eq!(shown("say \"hi\" \\o/"), r#""say \"hi\" \\o/""#);
        assert_eq!(shown("\u{0}"), r#""\u{0}""#);
    }

    #[test]
    fn long_text_is_cut_with_its_length() {
        let long = "x".repeat(1000);
        let shown = Untrusted(&long).to_string();
        assert_eq!(
            shown,
            format!("\"{}\"... (1000 bytes in all)", "x".repeat(MAX_CHARS))
        );
        let exact = "y".repeat(MAX_CHARS);
        assert_eq!(Untrusted(&exact).to_string(), format!("\"{exact}\""));
    }
}
