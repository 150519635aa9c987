//! Counters kept by the chat core: plain integers, updated on the loop thread.

use super::CloseReason;

/// Sessions ended, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseCounts {
    /// QUIT.
    pub quit: u64,
    /// Peer closed.
    pub eof: u64,
    /// Peer reset.
    pub reset: u64,
    /// Write to a gone peer.
    pub broken_pipe: u64,
    /// Transport timeout.
    pub timed_out: u64,
    /// Other I/O errors.
    pub io_error: u64,
    /// Fatal protocol errors, indexed by error code.
    pub protocol: [u64; 32],
    /// Idle timeout.
    pub idle_timeout: u64,
    /// Hello timeout.
    pub hello_timeout: u64,
    /// Slow consumer.
    pub slow_consumer: u64,
    /// Refused at the connection limit.
    pub server_full: u64,
    /// Session resumed elsewhere.
    pub taken_over: u64,
    /// Server shutdown.
    pub shutdown: u64,
    /// Kicked.
    pub kicked: u64,
}

impl CloseCounts {
    /// Counts one close.
    pub fn count(&mut self, reason: CloseReason) {
        match reason {
            CloseReason::Quit => self.quit += 1,
            CloseReason::Eof => self.eof += 1,
            CloseReason::Reset => self.reset += 1,
            CloseReason::BrokenPipe => self.broken_pipe += 1,
            CloseReason::TimedOut => self.timed_out += 1,
            CloseReason::IoError => self.io_error += 1,
            CloseReason::Protocol(code) => {
                if let Some(c) = self.protocol.get_mut(code.code() as usize) {
                    *c += 1;
                }
            }
            CloseReason::IdleTimeout => self.idle_timeout += 1,
            CloseReason::HelloTimeout => self.hello_timeout += 1,
            CloseReason::SlowConsumer => self.slow_consumer += 1,
            CloseReason::ServerFull => self.server_full += 1,
            CloseReason::TakenOver => self.taken_over += 1,
            CloseReason::Shutdown => self.shutdown += 1,
            CloseReason::Kicked => self.kicked += 1,
            // Its connection's loss was counted when the session was held
            // (`Stats::held_expired` counts these).
            CloseReason::ResumeExpired => {}
        }
    }

    /// Closes with protocol errors, all codes together.
    pub fn protocol_total(&self) -> u64 {
        self.protocol.iter().sum()
    }

    /// Every close, whatever the reason.
    pub fn total(&self) -> u64 {
        self.quit
            + self.eof
            + self.reset
            + self.broken_pipe
            + self.timed_out
            + self.io_error
            + self.protocol_total()
            + self.idle_timeout
            + self.hello_timeout
            + self.slow_consumer
            + self.server_full
            + self.taken_over
            + self.shutdown
            + self.kicked
    }
}

/// The chat core's counters. All are totals since start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Connections opened.
    pub accepted: u64,
    /// Sessions started by HELLO (resumes not included).
    pub sessions_started: u64,
    /// Sessions resumed by a new connection.
    pub resumes: u64,
    /// MESSAGE frames produced (one per SAY or post, whatever the room size).
    pub messages: u64,
    /// WHISPER frames produced.
    pub whispers: u64,
    /// MESSAGE and WHISPER frames addressed to connections (one per recipient).
    pub deliveries: u64,
    /// SAYs and WHISPERs a hook vetoed (dropped or refused).
    pub vetoed: u64,
    /// Events lost because the event queue was full (see `Chat::set_events`).
    pub events_dropped: u64,
    /// Times a connection's reads were paused by flood control.
    pub flood_pauses: u64,
    /// HELLOs with a 16-byte token that matched no live session (a guess, or a session
    /// that has ended): each starts a new session, but an attacker guessing tokens shows here.
    pub resume_failures: u64,
    /// Server PINGs sent.
    pub pings_sent: u64,
    /// Connections closed for not saying HELLO in time.
    pub hello_timeouts: u64,
    /// Connections closed for silence.
    pub idle_timeouts: u64,
    /// Bytes consumed by the decoder.
    pub bytes_in: u64,
    /// Frames received, indexed by opcode.
    pub frames_in: [u64; 256],
    /// ERROR frames sent, indexed by error code.
    pub errors_sent: [u64; 32],
    /// Sessions ended, by reason.
    pub closed: CloseCounts,
    /// Sessions held after their connection was lost (`ChatConfig::resume_window`).
    pub held: u64,
    /// Held sessions resumed by a new connection within their window (also in `resumes`).
    pub held_resumed: u64,
    /// Held sessions whose window ended without a resume (their rooms then got PRESENCE
    /// gone).
    pub held_expired: u64,
    /// WHISPERs kept for a held session, to be asked for with HISTORY.
    pub whispers_held: u64,
    /// HISTORY requests answered (with HISTORY_END; errors not included).
    pub history_requests: u64,
    /// HISTORY and HISTORY_WHISPER frames sent in answers.
    pub history_replayed: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            accepted: 0,
            sessions_started: 0,
            resumes: 0,
            messages: 0,
            whispers: 0,
            deliveries: 0,
            vetoed: 0,
            events_dropped: 0,
            flood_pauses: 0,
            resume_failures: 0,
            pings_sent: 0,
            hello_timeouts: 0,
            idle_timeouts: 0,
            bytes_in: 0,
            frames_in: [0; 256],
            errors_sent: [0; 32],
            closed: CloseCounts::default(),
            held: 0,
            held_resumed: 0,
            held_expired: 0,
            whispers_held: 0,
            history_requests: 0,
            history_replayed: 0,
        }
    }
}
