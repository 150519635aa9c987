//! Isolation under hostile load (issue 13): what one client does must not reach the log as
//! forged lines, the loop as a stall, or the others as lost messages. Each test here failed on
//! the code before its fix.

mod common;

use std::time::Duration;

use common::*;

/// A QUIT reason (and a nick, and any peer-supplied text) that holds a newline and terminal
/// escape sequences is logged escaped, on its own line: it cannot forge a log line or act on
/// the operator's terminal. (Before: the reason was written raw, so the fake `[ERROR] poll
/// failed` stood on a line of its own.)
#[test]
fn peer_text_in_logs_cannot_forge_lines_or_escape_to_the_terminal() {
    for kind in [ServerKind::Mio, ServerKind::Async] {
        let server = Server::start_kind(kind, &["--log-level", "debug"]);
        let mut c = server.login("mallory");
        c.quit("bye\n2026-12-04T00:00:00Z [ERROR] poll failed: forged\u{1b}[2J\u{9b}31m");
        c.expect_closed();
        let line = server
            .wait_log(Duration::from_secs(5), |l| l.contains("quit ("))
            .expect("the QUIT is logged at debug");
        let forged: Vec<String> = server
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("poll failed: forged"))
            .collect();
        assert_eq!(
            forged,
            std::slice::from_ref(&line),
            "{}: the reason stays inside the quit line",
            kind.name()
        );
        assert!(line.contains(r"\n2026-12-04"), "{line}");
        assert!(line.contains(r"\u{1b}[2J"), "ESC shown escaped: {line}");
        assert!(line.contains(r"\u{9b}31m"), "C1 CSI shown escaped: {line}");
    }
}
