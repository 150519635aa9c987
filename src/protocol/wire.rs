//! Field-level encoding: a bounds-checked cursor for reading payloads, and appenders for writing.
//!
//! Reading never panics: every read checks the remaining length first and reports a short
//! payload as an error value. Writing appends to a caller's `Vec<u8>`.

use byteorder::{BigEndian, ByteOrder};

use super::{HEADER_LEN, MAGIC, VERSION};

/// Why a payload could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldError {
    /// The payload ended inside a field.
    Short,
    /// A text field held invalid UTF-8.
    Utf8,
    /// Bytes were left after the last field.
    Trailing,
    /// A field had a length the protocol does not allow (a token that is not 0 or 16 bytes).
    Length,
}

/// A cursor over one payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FieldError> {
        if self.buf.len() < n {
            return Err(FieldError::Short);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FieldError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, FieldError> {
        Ok(BigEndian::read_u16(self.take(2)?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, FieldError> {
        Ok(BigEndian::read_u32(self.take(4)?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, FieldError> {
        Ok(BigEndian::read_u64(self.take(8)?))
    }

    /// `str`: u16 length, then that many bytes of UTF-8.
    pub(crate) fn str(&mut self) -> Result<&'a str, FieldError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| FieldError::Utf8)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], FieldError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// `rest` as raw bytes.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// `rest` as text.
    pub(crate) fn rest_str(&mut self) -> Result<&'a str, FieldError> {
        std::str::from_utf8(self.rest()).map_err(|_| FieldError::Utf8)
    }

    /// Succeeds only when every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), FieldError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FieldError::Trailing)
        }
    }
}

/// Appends a header with a zero length and returns where the frame starts; `end_frame`
/// patches the length once the payload is written. Encoding in place this way means a frame
/// is built once, directly in the buffer it is sent from.
pub(crate) fn begin_frame(out: &mut Vec<u8>, opcode: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[MAGIC[0], MAGIC[1], VERSION, opcode, 0, 0, 0, 0]);
    start
}

/// Patches the payload length of the frame that `begin_frame` started at `start`.
pub(crate) fn end_frame(out: &mut [u8], start: usize) {
    let len = out.len() - start - HEADER_LEN;
    debug_assert!(u32::try_from(len).is_ok(), "frame payload over 4 GiB");
    BigEndian::write_u32(&mut out[start + 4..start + 8], len as u32);
}

pub(crate) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    let mut b = [0; 2];
    BigEndian::write_u16(&mut b, v);
    out.extend_from_slice(&b);
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    let mut b = [0; 4];
    BigEndian::write_u32(&mut b, v);
    out.extend_from_slice(&b);
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    let mut b = [0; 8];
    BigEndian::write_u64(&mut b, v);
    out.extend_from_slice(&b);
}

/// `str`. Callers pass only strings that fit a u16 length (names are at most 64 bytes);
/// a longer one is cut at a character boundary rather than written with a wrong length.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    put_u16(out, end as u16);
    out.extend_from_slice(&s.as_bytes()[..end]);
}
