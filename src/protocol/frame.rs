//! Frame boundaries: header validation, and one whole frame off the front of a buffer
//! (`split_frame`). Splitting a stream that arrives in pieces is the `Deframer`'s job.
//!
//! As in mini-redis, finding out whether a whole frame is buffered (`check_header`) is separate
//! from parsing it (`ClientMsg::decode`), and "incomplete" is `Ok(None)`, an expected runtime
//! condition rather than an error. The header is judged byte by byte as it arrives: a bad magic
//! is reported after one byte, an oversized length as soon as the eighth header byte is in,
//! before any of the payload (so a peer cannot make the server buffer a frame it will refuse).

use byteorder::{BigEndian, ByteOrder};

use super::{HEADER_LEN, MAGIC, VERSION};

/// A fatal framing error: the stream cannot be resynchronised after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The first two bytes were not "CL".
    BadMagic,
    /// The version byte was not 1.
    UnsupportedVersion(u8),
    /// The announced payload length exceeds the limit.
    TooLarge {
        /// The length the header announced.
        len: u32,
        /// The limit in force.
        max: u32,
    },
}

impl FrameError {
    /// The protocol error code for this framing error.
    pub fn code(self) -> super::ErrorCode {
        match self {
            FrameError::BadMagic => super::ErrorCode::BadMagic,
            FrameError::UnsupportedVersion(_) => super::ErrorCode::UnsupportedVersion,
            FrameError::TooLarge { .. } => super::ErrorCode::FrameTooLarge,
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic => write!(f, "frame does not start with \"CL\""),
            FrameError::UnsupportedVersion(v) => write!(f, "protocol version {v} is not supported"),
            FrameError::TooLarge { len, max } => {
                write!(f, "payload of {len} bytes exceeds max_frame {max}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The opcode byte.
    pub opcode: u8,
    /// The payload length.
    pub len: u32,
}

impl Header {
    /// Header plus payload, in bytes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// Validates as much of a header as `buf` holds.
///
/// `Ok(None)`: fewer than 8 bytes, and those present are valid so far.
/// `Ok(Some(h))`: a whole valid header; the frame is complete once `buf.len() >= h.frame_len()`.
pub fn check_header(buf: &[u8], max_payload: u32) -> Result<Option<Header>, FrameError> {
    for (i, &b) in buf.iter().take(2).enumerate() {
        if b != MAGIC[i] {
            return Err(FrameError::BadMagic);
        }
    }
    if let Some(&v) = buf.get(2) {
        if v != VERSION {
            return Err(FrameError::UnsupportedVersion(v));
        }
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = BigEndian::read_u32(&buf[4..8]);
    if len > max_payload {
        return Err(FrameError::TooLarge {
            len,
            max: max_payload,
        });
    }
    Ok(Some(Header {
        opcode: buf[3],
        len,
    }))
}

/// One whole frame, borrowed from the buffer it was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// The opcode byte.
    pub opcode: u8,
    /// The payload.
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// Header plus payload, in bytes: how far to advance past this frame.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// Splits one whole frame off the front of `buf`, or `Ok(None)` when it is not yet complete.
pub fn split_frame(buf: &[u8], max_payload: u32) -> Result<Option<RawFrame<'_>>, FrameError> {
    match check_header(buf, max_payload)? {
        Some(h) if buf.len() >= h.frame_len() => Ok(Some(RawFrame {
            opcode: h.opcode,
            payload: &buf[HEADER_LEN..h.frame_len()],
        })),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x43, 0x4C, 1, op];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn header_is_judged_byte_by_byte() {
        assert_eq!(check_header(&[], 10), Ok(None));
        assert_eq!(check_header(&[0x43], 10), Ok(None));
        assert_eq!(check_header(&[0x44], 10), Err(FrameError::BadMagic));
        assert_eq!(check_header(&[0x43, 0x00], 10), Err(FrameError::BadMagic));
        assert_eq!(
            check_header(&[0x43, 0x4C, 2], 10),
            Err(FrameError::UnsupportedVersion(2))
        );
        assert_eq!(check_header(&[0x43, 0x4C, 1, 7, 0, 0, 0], 10), Ok(None));
        assert_eq!(
            check_header(&[0x43, 0x4C, 1, 7, 0, 0, 0, 11], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(
            check_header(&[0x43, 0x4C, 1, 7, 0, 0, 0, 10], 10),
            Ok(Some(Header { opcode: 7, len: 10 }))
        );
        // The largest length a u32 can say must not overflow anything.
        assert!(check_header(&[0x43, 0x4C, 1, 7, 0xFF, 0xFF, 0xFF, 0xFF], u32::MAX).is_ok());
    }

    #[test]
    fn split_needs_the_whole_payload() {
        let f = frame(7, b"abc");
        for cut in 0..f.len() {
            assert_eq!(split_frame(&f[..cut], 100), Ok(None));
        }
        let whole = split_frame(&f, 100).unwrap().unwrap();
        assert_eq!(
            (whole.opcode, whole.payload, whole.frame_len()),
            (7, &b"abc"[..], 11)
        );
    }

    use proptest::prelude::*;

    fn frames_strategy() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..48)),
            0..12,
        )
    }

    /// Feeds `stream` in the pieces given by `cuts` (offsets, any order), keeping what is not
    /// consumed as a driver does; returns the frames and the bytes left over.
    fn split_driver(stream: &[u8], cuts: &[usize], max: u32) -> (Vec<(u8, Vec<u8>)>, usize) {
        let mut points: Vec<usize> = cuts.to_vec();
        points.sort_unstable();
        points.push(stream.len());
        let mut got = Vec::new();
        let mut pending = Vec::new();
        let mut fed = 0;
        for p in points {
            pending.extend_from_slice(&stream[fed..p]);
            fed = p;
            while let Some(f) = split_frame(&pending, max).expect("valid stream") {
                let n = f.frame_len();
                got.push((f.opcode, f.payload.to_vec()));
                pending.drain(..n);
            }
        }
        (got, pending.len())
    }

    proptest! {
        #[test]
        fn decoding_is_independent_of_how_the_stream_is_split(
            frames in frames_strategy(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let stream: Vec<u8> = frames.iter().flat_map(|(op, p)| frame(*op, p)).collect();
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            let (got, left) = split_driver(&stream, &cuts, 48);
            prop_assert_eq!(left, 0);
            prop_assert_eq!(&got, &frames);
            // Every single split point, and one byte at a time.
            for cut in 0..=stream.len() {
                let (got, left) = split_driver(&stream, &[cut], 48);
                prop_assert_eq!(left, 0);
                prop_assert_eq!(&got, &frames);
            }
            let every: Vec<usize> = (0..stream.len()).collect();
            prop_assert_eq!(split_driver(&stream, &every, 48).0, frames.clone());
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..600),
            header_ok in any::<bool>(),
            max in 0u32..80,
        ) {
            if header_ok {
                // Give the garbage a valid start so lengths and payloads get exercised.
                for (b, h) in bytes.iter_mut().zip([0x43, 0x4C, 1]) {
                    *b = h;
                }
            }
            // split_frame over the whole buffer: stops at the first error or partial frame.
            let mut rest = &bytes[..];
            while let Ok(Some(f)) = split_frame(rest, max) {
                let (op, payload, n) = (f.opcode, f.payload, f.frame_len());
                prop_assert!(n >= HEADER_LEN && n <= rest.len());
                prop_assert_eq!(payload.len(), n - HEADER_LEN);
                prop_assert!(payload.len() as u32 <= max);
                // Typed decoding of whatever came out must not panic either.
                let _ = crate::protocol::ClientMsg::decode(op, payload);
                let _ = crate::protocol::ServerMsg::decode(op, payload);
                rest = &rest[n..];
            }
            // check_header on every prefix agrees with itself: once an error, always an error.
            let mut failed = false;
            for end in 0..=bytes.len().min(HEADER_LEN) {
                let r = check_header(&bytes[..end], max);
                if failed {
                    prop_assert!(r.is_err());
                }
                failed |= r.is_err();
            }
        }
    }
}
