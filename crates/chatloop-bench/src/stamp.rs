//! The payload of a benchmark SAY: send time, publisher and sequence number as fixed-width hex,
//! padded to the requested size; and the in-place parse of the MESSAGE frames that carry it.
//!
//! Text layout (valid UTF-8, exactly `size` bytes, `size >= STAMP_LEN`):
//! `tttttttttttttttt pppp ssssssssssss` (no spaces) then `.` padding, where `t` is the send time
//! in ns since the run's epoch (16 hex digits), `p` the publisher index (4) and `s` the
//! publisher's sequence number (12).

use chatloop::protocol::{MAGIC, VERSION, op};

/// Bytes of the stamp at the start of every benchmark text.
pub const STAMP_LEN: usize = 32;

/// What a benchmark text carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, ns since the run's epoch.
    pub ts: u64,
    /// Publisher index.
    pub publisher: u32,
    /// The publisher's sequence number.
    pub seq: u64,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut Vec<u8>, v: u64, digits: u32) {
    for i in (0..digits).rev() {
        out.push(HEX[((v >> (4 * i)) & 0xF) as usize]);
    }
}

/// Appends a whole SAY frame for `room` whose text is a stamp padded to `size` bytes.
pub fn put_say(out: &mut Vec<u8>, room: &str, stamp: Stamp, size: usize) {
    debug_assert!(size >= STAMP_LEN);
    let payload = 2 + room.len() + size;
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(op::SAY);
    out.extend_from_slice(&(payload as u32).to_be_bytes());
    out.extend_from_slice(&(room.len() as u16).to_be_bytes());
    out.extend_from_slice(room.as_bytes());
    put_hex(out, stamp.ts, 16);
    put_hex(out, u64::from(stamp.publisher), 4);
    put_hex(out, stamp.seq & 0xFFFF_FFFF_FFFF, 12);
    out.resize(out.len() + size - STAMP_LEN, b'.');
}

/// Eight lowercase hex digits to their value, branch-free (SWAR). `None` if a byte is clearly
/// not a hex digit (bit 7 set or bit 5 clear, which every digit and `a`-`f` have).
#[inline]
fn hex8(b: &[u8]) -> Option<u32> {
    let v = u64::from_be_bytes(b[..8].try_into().ok()?);
    if v & 0xA0A0_A0A0_A0A0_A0A0 != 0x2020_2020_2020_2020 {
        return None;
    }
    // '0'..'9' = 0x30..0x39 -> low nibble; 'a'..'f' = 0x61..0x66 -> low nibble + 9.
    let letter = (v >> 6) & 0x0101_0101_0101_0101;
    let nib = (v & 0x0F0F_0F0F_0F0F_0F0F) + letter * 9;
    let bytes = (nib | (nib >> 4)) & 0x00FF_00FF_00FF_00FF;
    let words = (bytes | (bytes >> 8)) & 0x0000_FFFF_0000_FFFF;
    Some(((words >> 16) | words) as u32)
}

/// Parses a stamp from the start of a text.
#[inline]
pub fn parse_stamp(text: &[u8]) -> Option<Stamp> {
    if text.len() < STAMP_LEN {
        return None;
    }
    let ts = (u64::from(hex8(&text[0..8])?) << 32) | u64::from(hex8(&text[8..16])?);
    let mid = hex8(&text[16..24])?;
    let low = hex8(&text[24..32])?;
    Some(Stamp {
        ts,
        publisher: mid >> 16,
        seq: (u64::from(mid & 0xFFFF) << 32) | u64::from(low),
    })
}

/// The text of a MESSAGE payload (msg_id u64, room str, from str, text rest), located without
/// decoding or validating the other fields.
#[inline]
pub fn message_text(payload: &[u8]) -> Option<&[u8]> {
    let room_len = usize::from(u16::from_be_bytes([*payload.get(8)?, *payload.get(9)?]));
    let at = 10 + room_len;
    let from_len = usize::from(u16::from_be_bytes([
        *payload.get(at)?,
        *payload.get(at + 1)?,
    ]));
    payload.get(at + 2 + from_len..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatloop::protocol::{ClientMsg, encode, split_frame};

    #[test]
    fn say_round_trips_through_the_crate_codec() {
        let stamp = Stamp {
            ts: 0x0123_4567_89ab_cdef,
            publisher: 0xbeef,
            seq: 0xfedc_ba98_7654,
        };
        for size in [32, 33, 64, 1000] {
            let mut out = Vec::new();
            put_say(&mut out, "bench", stamp, size);
            let f = split_frame(&out, 1 << 20).unwrap().unwrap();
            assert_eq!(f.frame_len(), out.len());
            let ClientMsg::Say { room, text } = ClientMsg::decode(f.opcode, f.payload).unwrap()
            else {
                panic!("not a SAY")
            };
            assert_eq!((room, text.len()), ("bench", size));
            assert_eq!(parse_stamp(text.as_bytes()), Some(stamp));
            // As the server relays it.
            let mut relayed = Vec::new();
            encode::message(&mut relayed, 7, room, "alice", text);
            let m = split_frame(&relayed, 1 << 20).unwrap().unwrap();
            assert_eq!(message_text(m.payload), Some(text.as_bytes()));
        }
    }

    #[test]
    fn hex_decoding_matches_scalar() {
        for v in [
            0u64,
            1,
            9,
            10,
            15,
            0xdead_beef,
            u64::MAX >> 1,
            0x1234_5678_9abc_def0,
        ] {
            let s = format!("{v:016x}");
            let got = (u64::from(hex8(&s.as_bytes()[..8]).unwrap()) << 32)
                | u64::from(hex8(&s.as_bytes()[8..]).unwrap());
            assert_eq!(got, v);
        }
        assert_eq!(hex8(b"ABCDEFGH"), None);
        assert_eq!(parse_stamp(b"short"), None);
    }
}
