//! The one splitter of a byte stream into frames, for every reader of the protocol: the chat
//! core (client frames), the terminal client and the load generator (server frames).
//!
//! A [`Deframer`] is fed whatever chunks the transport delivers (one byte or a thousand frames
//! at a time) and hands back whole frames. Whole frames are borrowed straight from the chunk;
//! only an incomplete frame at the end of a chunk is copied, into the deframer's own buffer,
//! and completed there with exactly the bytes it lacks, so a byte is copied at most once and
//! a frame is parsed only when all of it is there (mini-redis's check-then-parse).
//!
//! Invariants (checked with `debug_assert!`):
//! - `buf` holds the beginning of exactly one frame, never bytes of two; it is a whole frame
//!   only between the call that returned that frame and the next call, which discards it;
//! - its capacity never exceeds the frame's length as the header announced it (the header's
//!   8 bytes until the header is complete), nor twice the bytes that arrived (or 256, if
//!   more): a peer's partial frame costs about what it sent and at most what it declared, a
//!   partial header 8 bytes, and an empty deframer no allocation at all.

use super::HEADER_LEN;
use super::frame::{FrameError, RawFrame, check_header};

/// Smallest allocation for a partial payload: a frame trickling in a few bytes at a time
/// should not reallocate on every read.
const MIN_CAPACITY: usize = 256;

/// Splits a byte stream into frames, keeping an incomplete frame between calls.
/// One frame is buffered at most, in memory sized to what arrived (never more than the header
/// declared), and none between frames.
///
/// ```
/// use chatloop::protocol::{ClientMsg, Deframer};
///
/// let mut wire = Vec::new();
/// ClientMsg::Join { room: "lobby" }.encode(&mut wire);
/// ClientMsg::Say { room: "lobby", text: "hi" }.encode(&mut wire);
///
/// let mut deframer = Deframer::new();
/// let mut ops = Vec::new();
/// // The stream arrives in pieces of 5 bytes, cutting frames anywhere.
/// for mut chunk in wire.chunks(5) {
///     while let Some(f) = deframer.next(&mut chunk, 65_536).expect("a valid stream") {
///         ops.push(f.opcode);
///     }
/// }
/// assert_eq!(ops, [0x02, 0x04]);
/// assert_eq!(deframer.buffered(), 0);
/// ```
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    /// An empty deframer (no allocation).
    pub const fn new() -> Self {
        Deframer { buf: Vec::new() }
    }

    /// Bytes of an incomplete frame held from earlier chunks.
    pub fn buffered(&self) -> usize {
        if self.holds_returned_frame() {
            0
        } else {
            self.buf.len()
        }
    }

    /// Bytes of memory held for the incomplete frame (its buffer's capacity).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next whole frame, taking bytes from the front of `data` and advancing it past them.
    ///
    /// `Ok(Some(frame))`: a whole frame; it borrows `data` (or, when it began in an earlier
    /// chunk, this deframer) until the next call. `Ok(None)`: `data` is used up; an incomplete
    /// frame at its end is kept for the next chunk. `Err`: the header is invalid (judged byte
    /// by byte, so a bad magic is caught at its first byte and an oversized length before any
    /// payload); the stream cannot be resynchronised, so the caller stops feeding it.
    pub fn next<'r, 'd: 'r>(
        &'r mut self,
        data: &mut &'d [u8],
        max_payload: u32,
    ) -> Result<Option<RawFrame<'r>>, FrameError> {
        if self.holds_returned_frame() {
            // Returned by the previous call: an idle stream keeps no allocation.
            self.buf = Vec::new();
        }
        if self.buf.is_empty() {
            // The common case: whole frames straight from the chunk, no copy.
            let chunk: &'d [u8] = data;
            return match check_header(chunk, max_payload)? {
                Some(h) if chunk.len() >= h.frame_len() => {
                    let (frame, rest) = chunk.split_at(h.frame_len());
                    *data = rest;
                    Ok(Some(RawFrame {
                        opcode: h.opcode,
                        payload: &frame[HEADER_LEN..],
                    }))
                }
                header => {
                    if !chunk.is_empty() {
                        let limit = header.map_or(HEADER_LEN, |h| h.frame_len());
                        self.append(chunk, limit);
                        *data = &[];
                    }
                    Ok(None)
                }
            };
        }
        // An incomplete frame is buffered: complete it with only the bytes it lacks (first
        // the rest of its header, then the rest of its payload), judging the header as it
        // grows.
        loop {
            let (need, whole) = match check_header(&self.buf, max_payload)? {
                Some(h) => (h.frame_len(), true),
                None => (HEADER_LEN, false),
            };
            if self.buf.len() < need {
                if data.is_empty() {
                    return Ok(None);
                }
                let take = (need - self.buf.len()).min(data.len());
                let (head, rest) = data.split_at(take);
                self.append(head, need);
                *data = rest;
            } else if whole {
                debug_assert_eq!(self.buf.len(), need);
                return Ok(Some(RawFrame {
                    opcode: self.buf[3],
                    payload: &self.buf[HEADER_LEN..],
                }));
            }
            // else: the header just became whole; judge it and learn the frame's length.
        }
    }

    /// Drops any buffered bytes (the stream was abandoned).
    pub fn clear(&mut self) {
        self.buf = Vec::new();
    }

    /// Whether `buf` is the whole frame the previous call returned. The buffer only ever
    /// holds an incomplete frame otherwise, so a whole one can only be that.
    fn holds_returned_frame(&self) -> bool {
        self.buf.len() >= HEADER_LEN
            && check_header(&self.buf, u32::MAX)
                .ok()
                .flatten()
                .is_some_and(|h| h.frame_len() == self.buf.len())
    }

    /// Appends `bytes` of a frame whose length (or, while the header is incomplete, the
    /// header's length) is `limit`. Capacity grows geometrically, so a frame that trickles in
    /// is not reallocated on every read, but never beyond `limit`: the peer pays for what it
    /// declared, not for our rounding.
    fn append(&mut self, bytes: &[u8], limit: usize) {
        let need = self.buf.len() + bytes.len();
        debug_assert!(need <= limit, "a deframer buffers one frame at most");
        if need > self.buf.capacity() {
            let target = need
                .max(self.buf.capacity() * 2)
                .max(MIN_CAPACITY)
                .min(limit)
                .max(need);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
        debug_assert!(self.buf.capacity() <= limit.max(self.buf.len()));
        debug_assert!(self.buf.capacity() <= (2 * self.buf.len()).max(MIN_CAPACITY));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x43, 0x4C, 1, op];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Feeds `stream` in the given pieces; returns the frames, the error if any, and what is
    /// left buffered.
    fn run(stream: &[u8], cuts: &[usize], max: u32) -> (Vec<(u8, Vec<u8>)>, Option<FrameError>) {
        let mut points: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
        points.sort_unstable();
        points.push(stream.len());
        let mut d = Deframer::new();
        let mut got = Vec::new();
        let mut from = 0;
        for p in points {
            let mut chunk = &stream[from..p];
            from = p;
            loop {
                match d.next(&mut chunk, max) {
                    Ok(Some(f)) => {
                        assert!(f.payload.len() as u32 <= max);
                        let len = f.frame_len();
                        got.push((f.opcode, f.payload.to_vec()));
                        assert!(d.capacity() <= len, "never more than the frame's length");
                        assert!(d.capacity() <= (2 * len).max(MIN_CAPACITY));
                    }
                    Ok(None) => {
                        assert!(chunk.is_empty(), "None only once the chunk is used up");
                        break;
                    }
                    Err(e) => return (got, Some(e)),
                }
            }
        }
        assert_eq!(from, stream.len());
        (got, None)
    }

    #[test]
    fn a_partial_header_costs_its_bytes_and_an_idle_deframer_nothing() {
        let f = frame(7, &[9; 1000]);
        let mut d = Deframer::new();
        let mut chunk = &f[..3];
        assert_eq!(d.next(&mut chunk, 2000), Ok(None));
        assert_eq!((d.buffered(), d.capacity()), (3, HEADER_LEN));
        // The header completes: capacity grows with what arrives, never past the frame.
        let mut chunk = &f[3..20];
        assert_eq!(d.next(&mut chunk, 2000), Ok(None));
        assert_eq!(d.buffered(), 20);
        assert!(d.capacity() >= 20 && d.capacity() <= f.len());
        let mut chunk = &f[20..];
        let got = d.next(&mut chunk, 2000).expect("valid").expect("whole");
        assert_eq!((got.opcode, got.payload.len()), (7, 1000));
        assert_eq!(d.buffered(), 0);
        let mut empty: &[u8] = &[];
        assert_eq!(d.next(&mut empty, 2000), Ok(None));
        assert_eq!(
            d.capacity(),
            0,
            "the returned frame is freed by the next call"
        );
    }

    #[test]
    fn the_header_is_judged_as_it_arrives() {
        let mut d = Deframer::new();
        let mut chunk: &[u8] = &[0x43];
        assert_eq!(d.next(&mut chunk, 10), Ok(None));
        let mut chunk: &[u8] = &[0x4C, 1, 7, 0, 0, 0, 11];
        assert_eq!(
            d.next(&mut chunk, 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        let mut d = Deframer::new();
        let mut chunk: &[u8] = &[0x44];
        assert_eq!(d.next(&mut chunk, 10), Err(FrameError::BadMagic));
        // A bad byte after a good frame in the same chunk: the frame first, then the error.
        let mut stream = frame(1, b"ok");
        stream.push(0x00);
        let (got, err) = run(&stream, &[], 10);
        assert_eq!(got, vec![(1, b"ok".to_vec())]);
        assert_eq!(err, Some(FrameError::BadMagic));
    }

    #[test]
    fn an_empty_payload_frame_split_in_its_header() {
        let f = frame(9, b"");
        for cut in 0..=f.len() {
            assert_eq!(run(&f, &[cut], 10), (vec![(9, vec![])], None), "cut {cut}");
        }
    }

    proptest! {
        #[test]
        fn splitting_never_changes_the_frames(
            frames in proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..600)), 0..8),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let stream: Vec<u8> = frames.iter().flat_map(|(op, p)| frame(*op, p)).collect();
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            prop_assert_eq!(run(&stream, &cuts, 600), (frames.clone(), None));
            let every: Vec<usize> = (0..stream.len()).collect();
            prop_assert_eq!(run(&stream, &every, 600), (frames, None));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_agree_with_split_frame(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..600),
            header_ok in any::<bool>(),
            max in 0u32..80,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            if header_ok {
                for (b, h) in bytes.iter_mut().zip([0x43, 0x4C, 1]) {
                    *b = h;
                }
            }
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            // The reference: split_frame over the whole buffer.
            let mut want = Vec::new();
            let mut rest = &bytes[..];
            let want_err = loop {
                match crate::protocol::split_frame(rest, max) {
                    Ok(Some(f)) => {
                        want.push((f.opcode, f.payload.to_vec()));
                        rest = &rest[f.frame_len()..];
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            prop_assert_eq!(run(&bytes, &cuts, max), (want, want_err));
        }
    }
}
