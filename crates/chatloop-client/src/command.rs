//! Parsing of input lines into commands.

/// One line of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/join ROOM`: join and make it the current room.
    Join(String),
    /// `/leave ROOM`.
    Leave(String),
    /// `/switch ROOM`: make a joined room the current room.
    Switch(String),
    /// `/msg NICK TEXT`: whisper.
    Msg {
        /// Target nick.
        nick: String,
        /// Text.
        text: String,
    },
    /// `/who [ROOM]`: list a room's members (the current room by default).
    Who(Option<String>),
    /// `/history ROOM [K]`: the last K messages the server keeps of a room we are in.
    History {
        /// The room.
        room: String,
        /// How many, at most (at least 1).
        count: u32,
    },
    /// `/quit [REASON]`.
    Quit(String),
    /// `/help`.
    Help,
    /// Any other line: said in the current room.
    Say(String),
}

/// The `/help` text.
pub const HELP: &str = "\
commands:
  /join ROOM        join ROOM and make it the current room
  /leave ROOM       leave ROOM
  /switch ROOM      make ROOM (already joined) the current room
  /msg NICK TEXT    whisper TEXT to NICK
  /who [ROOM]       list the members of ROOM (default: the current room)
  /history ROOM [K] the last K (default 20) messages the server keeps of ROOM
  /quit [REASON]    leave the chat and exit
  /help             this text
  any other line is said in the current room; start it with // to say a line beginning with /";

/// How many messages `/history ROOM` shows without a count.
pub const HISTORY_DEFAULT: u32 = 20;

/// Parses one line (without its line ending). `Ok(None)` for a blank line; `Err` is a
/// one-line `name: detail` message for the user.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    if let Some(rest) = line.strip_prefix("//") {
        return Ok(Some(Command::Say(format!("/{rest}"))));
    }
    let Some(body) = line.strip_prefix('/') else {
        return Ok(Some(Command::Say(line.to_string())));
    };
    let (name, args) = match body.find(char::is_whitespace) {
        Some(i) => (&body[..i], body[i..].trim_start()),
        None => (body, ""),
    };
    let words: Vec<&str> = args.split_whitespace().collect();
    let one = |usage: &str| match words.as_slice() {
        [w] => Ok(w.to_string()),
        _ => Err(format!("usage: {usage}")),
    };
    let cmd = match name {
        "join" => Command::Join(one("/join ROOM")?),
        "leave" => Command::Leave(one("/leave ROOM")?),
        "switch" => Command::Switch(one("/switch ROOM")?),
        "msg" => {
            let Some(nick) = words.first() else {
                return Err("usage: /msg NICK TEXT".into());
            };
            let text = args[nick.len()..].trim_start();
            if text.is_empty() {
                return Err("usage: /msg NICK TEXT".into());
            }
            Command::Msg {
                nick: nick.to_string(),
                text: text.to_string(),
            }
        }
        "who" => match words.as_slice() {
            [] => Command::Who(None),
            [room] => Command::Who(Some(room.to_string())),
            _ => return Err("usage: /who [ROOM]".into()),
        },
        "history" => {
            let usage = || "usage: /history ROOM [K] (K from 1 to 4294967295)".to_string();
            let (room, count) = match words.as_slice() {
                [room] => (room, HISTORY_DEFAULT),
                [room, k] => (room, k.parse().ok().filter(|&k| k > 0).ok_or_else(usage)?),
                _ => return Err(usage()),
            };
            Command::History {
                room: room.to_string(),
                count,
            }
        }
        "quit" => Command::Quit(args.trim_end().to_string()),
        "help" => Command::Help,
        _ => {
            return Err(format!(
                "unknown_command: /{} (try /help)",
                crate::output::clean(name)
            ));
        }
    };
    Ok(Some(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Command {
        parse(s).expect("parses").expect("a command")
    }

    #[test]
    fn commands() {
        assert_eq!(p("/join lobby"), Command::Join("lobby".into()));
        assert_eq!(p("/leave  lobby "), Command::Leave("lobby".into()));
        assert_eq!(p("/switch dev"), Command::Switch("dev".into()));
        assert_eq!(
            p("/msg bob  hi  there "),
            Command::Msg {
                nick: "bob".into(),
                text: "hi  there ".into()
            }
        );
        assert_eq!(p("/who"), Command::Who(None));
        assert_eq!(p("/who dev"), Command::Who(Some("dev".into())));
        assert_eq!(
            p("/history lobby"),
            Command::History {
                room: "lobby".into(),
                count: HISTORY_DEFAULT
            }
        );
        assert_eq!(
            p("/history dev 5"),
            Command::History {
                room: "dev".into(),
                count: 5
            }
        );
        assert_eq!(p("/quit"), Command::Quit(String::new()));
        assert_eq!(
            p("/quit gone fishing"),
            Command::Quit("gone fishing".into())
        );
        assert_eq!(p("/help"), Command::Help);
        assert_eq!(p("hello /join x"), Command::Say("hello /join x".into()));
        assert_eq!(p("//join x"), Command::Say("/join x".into()));
        assert_eq!(p("  padded\r\n"), Command::Say("  padded".into()));
        assert_eq!(parse("   "), Ok(None));
    }

    #[test]
    fn usage_errors() {
        assert!(parse("/join").unwrap_err().starts_with("usage: /join"));
        assert!(parse("/join a b").is_err());
        assert!(parse("/msg bob").is_err());
        assert!(parse("/who a b").is_err());
        for bad in [
            "/history",
            "/history a 0",
            "/history a -1",
            "/history a x",
            "/history a 1 2",
        ] {
            assert!(
                parse(bad).unwrap_err().starts_with("usage: /history"),
                "{bad}"
            );
        }
        assert!(
            parse("/frobnicate now")
                .unwrap_err()
                .starts_with("unknown_command: /frobnicate")
        );
    }
}
