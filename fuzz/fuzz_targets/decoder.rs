//! The frame decoder fed an arbitrary byte stream in arbitrary chunks.
//!
//! Input layout: byte 0 picks max_frame, byte 1 the number of chunk lengths (0 to 15) that
//! follow, one byte each (a length of 0 means 1); the rest is the stream, cut into chunks of
//! those lengths in turn. Checks:
//! - nothing panics (`split_frame`, `check_header`, `Deframer`, `ClientMsg::decode`,
//!   `ServerMsg::decode`, the encoders);
//! - chunking never changes the outcome: the frames and the final error are the same whether
//!   the stream is split whole, or fed to a `Deframer` (the one splitter the core, the
//!   client and the load generator use) chunk by chunk;
//! - a decoded client message encodes back to exactly the bytes it came from; a decoded
//!   server message survives encode and decode unchanged.
#![no_main]

use chatloop::protocol::{ClientMsg, Deframer, FrameError, ServerMsg, split_frame};
use libfuzzer_sys::fuzz_target;

type Frames = Vec<(u8, Vec<u8>)>;

/// Frames of the whole stream at once, the error that stopped it, and the bytes left over
/// (0 after an error).
fn whole(stream: &[u8], max: u32) -> (Frames, Option<FrameError>, usize) {
    let mut frames = Vec::new();
    let mut off = 0;
    loop {
        match split_frame(&stream[off..], max) {
            Ok(Some(f)) => {
                frames.push((f.opcode, f.payload.to_vec()));
                off += f.frame_len();
            }
            Ok(None) => return (frames, None, stream.len() - off),
            Err(e) => return (frames, Some(e), 0),
        }
    }
}

fn chunks<'a>(stream: &'a [u8], lens: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = stream;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = if lens.is_empty() {
            rest.len()
        } else {
            usize::from(lens[i % lens.len()].max(1))
        };
        i += 1;
        let (c, r) = rest.split_at(n.min(rest.len()));
        rest = r;
        Some(c)
    })
}

/// As every reader of the protocol (the chat core, the clients) splits a stream: a
/// `Deframer` fed chunk by chunk; frames straight from the chunk, an incomplete one kept.
fn with_deframer(stream: &[u8], lens: &[u8], max: u32) -> (Frames, Option<FrameError>, usize) {
    let mut d = Deframer::new();
    let mut frames = Vec::new();
    for mut c in chunks(stream, lens) {
        loop {
            match d.next(&mut c, max) {
                Ok(Some(f)) => {
                    let len = f.frame_len();
                    frames.push((f.opcode, f.payload.to_vec()));
                    assert!(d.capacity() <= len, "a deframer holds one frame at most");
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e), 0),
            }
        }
        assert!(c.is_empty(), "None only once the chunk is used up");
    }
    // Memory grows with what arrived, not with what the header announced.
    assert!(d.capacity() <= (2 * d.buffered()).max(256));
    let left = d.buffered();
    (frames, None, left)
}

fn check_messages(op: u8, payload: &[u8]) {
    let mut frame = vec![0x43, 0x4C, 1, op];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    if let Ok(m) = ClientMsg::decode(op, payload) {
        assert_eq!(m.opcode(), op);
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(
            out, frame,
            "client message {m:?} does not encode back to its bytes"
        );
    }
    if let Ok(m) = ServerMsg::decode(op, payload) {
        if let ServerMsg::Roster { nicks, .. } = m {
            assert_eq!(nicks.count() as usize, nicks.clone().count());
        }
        let mut out = Vec::new();
        m.encode(&mut out);
        let f = split_frame(&out, u32::MAX).unwrap().unwrap();
        assert_eq!(f.frame_len(), out.len());
        assert_eq!(f.opcode, op);
        let again = ServerMsg::decode(op, f.payload).expect("re-encoded server message decodes");
        assert_eq!(again, m);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = match data[0] % 6 {
        0 => 0,
        1 => 8,
        2 => 64,
        3 => 65_536,
        4 => u32::MAX,
        _ => u32::from(data[0]),
    };
    let n = usize::from(data[1] % 16).min(data.len() - 2);
    let lens = &data[2..2 + n];
    let stream = &data[2 + n..];

    let reference = whole(stream, max);
    assert_eq!(
        with_deframer(stream, lens, max),
        reference,
        "Deframer, chunks {lens:?}"
    );
    for (op, payload) in &reference.0 {
        check_messages(*op, payload);
    }
    // Payloads without framing (also those a bad header hides).
    if let Some((&op, payload)) = stream.split_first() {
        check_messages(op, payload);
    }
});
