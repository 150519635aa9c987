//! An independent codec for the model test, written from docs/PROTOCOL.md only: client frames
//! are built byte by byte (so malformed ones are as easy as well-formed ones) and server
//! frames are decoded strictly into owned, comparable values. Nothing here uses the crate's
//! `protocol` module, so a mistake shared by the core's encoder and decoder cannot hide.

/// Frame header bytes.
pub const MAGIC: [u8; 2] = [0x43, 0x4C];
/// The protocol version.
pub const VERSION: u8 = 1;
/// Bytes in a header.
pub const HEADER: usize = 8;
/// A server payload may exceed max_frame by this much.
pub const SLACK: usize = 128;
/// The model assumes no ERROR detail is longer than this (it only bounds how many bytes an
/// ERROR frame costs against max-pending); every decoded ERROR is checked against it.
pub const MAX_DETAIL: usize = 200;

/// Client opcodes.
pub mod op {
    pub const HELLO: u8 = 0x01;
    pub const JOIN: u8 = 0x02;
    pub const LEAVE: u8 = 0x03;
    pub const SAY: u8 = 0x04;
    pub const WHISPER: u8 = 0x05;
    pub const WHO: u8 = 0x06;
    pub const PING: u8 = 0x07;
    pub const PONG: u8 = 0x08;
    pub const QUIT: u8 = 0x09;
    pub const HISTORY: u8 = 0x0A;
}

/// A whole frame with any opcode and payload.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![MAGIC[0], MAGIC[1], VERSION, opcode];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A `str` field: u16 length, then the bytes (which need not be UTF-8 here).
pub fn str_field(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A server frame, owned and normalised for comparison: ERROR keeps code and fatal flag (the
/// detail is not part of the contract), PING keeps nothing (its 8 bytes are opaque).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Frame {
    Welcome {
        conn_id: u64,
        token: [u8; 16],
        max_frame: u32,
        heartbeat_ms: u32,
        nick: String,
    },
    Message {
        msg_id: u64,
        room: String,
        from: String,
        text: String,
    },
    Whisper {
        msg_id: u64,
        from: String,
        text: String,
    },
    Presence {
        kind: u8,
        room: String,
        nick: String,
    },
    /// One ROSTER frame.
    Roster {
        room: String,
        more: bool,
        nicks: Vec<String>,
    },
    Ping,
    Pong(Vec<u8>),
    Error {
        code: u16,
        fatal: bool,
    },
    /// HISTORY (0x88): a kept MESSAGE, replayed.
    History {
        msg_id: u64,
        room: String,
        from: String,
        text: String,
    },
    /// HISTORY_WHISPER (0x89): a WHISPER kept for a held session, replayed.
    HistoryWhisper {
        msg_id: u64,
        from: String,
        text: String,
    },
    /// HISTORY_END (0x8A).
    HistoryEnd {
        room: String,
        epoch: u64,
        status: u8,
        count: u32,
    },
}

/// HISTORY_END status values (PROTOCOL.md 12.3).
pub const COMPLETE: u8 = 0;
pub const MORE: u8 = 1;
pub const GAP: u8 = 2;

pub const JOIN: u8 = 1;
pub const LEAVE: u8 = 2;
pub const QUIT: u8 = 3;
pub const GONE: u8 = 4;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err(format!("payload ends {} bytes early", n - self.b.len()));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().unwrap()))
    }
    fn text(b: &[u8]) -> Result<String, String> {
        String::from_utf8(b.to_vec()).map_err(|e| format!("invalid UTF-8: {e}"))
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.u16()? as usize;
        Self::text(self.take(n)?)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn rest_str(&mut self) -> Result<String, String> {
        Self::text(self.rest())
    }
    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("flag byte {v} is neither 0 nor 1")),
        }
    }
}

/// Decodes one server payload strictly.
pub fn decode(opcode: u8, payload: &[u8]) -> Result<Frame, String> {
    let mut r = Reader { b: payload };
    let f = match opcode {
        0x81 => Frame::Welcome {
            conn_id: r.u64()?,
            token: r.take(16)?.try_into().unwrap(),
            max_frame: r.u32()?,
            heartbeat_ms: r.u32()?,
            nick: r.str()?,
        },
        0x82 => Frame::Message {
            msg_id: r.u64()?,
            room: r.str()?,
            from: r.str()?,
            text: r.rest_str()?,
        },
        0x83 => Frame::Whisper {
            msg_id: r.u64()?,
            from: r.str()?,
            text: r.rest_str()?,
        },
        0x84 => {
            let kind = r.u8()?;
            if !(1..=4).contains(&kind) {
                return Err(format!("PRESENCE kind {kind}"));
            }
            Frame::Presence {
                kind,
                room: r.str()?,
                nick: r.str()?,
            }
        }
        0x85 => {
            let room = r.str()?;
            let more = r.flag()?;
            let count = r.u32()?;
            let mut nicks = Vec::new();
            for _ in 0..count {
                nicks.push(r.str()?);
            }
            Frame::Roster { room, more, nicks }
        }
        0x86 => {
            let data = r.rest();
            if data.len() != 8 {
                return Err(format!("server PING carries {} bytes, not 8", data.len()));
            }
            Frame::Ping
        }
        0x87 => Frame::Pong(r.rest().to_vec()),
        0x88 => Frame::History {
            msg_id: r.u64()?,
            room: r.str()?,
            from: r.str()?,
            text: r.rest_str()?,
        },
        0x89 => Frame::HistoryWhisper {
            msg_id: r.u64()?,
            from: r.str()?,
            text: r.rest_str()?,
        },
        0x8A => {
            let f = Frame::HistoryEnd {
                room: r.str()?,
                epoch: r.u64()?,
                status: r.u8()?,
                count: r.u32()?,
            };
            if let Frame::HistoryEnd { status, epoch, .. } = f {
                if status > GAP {
                    return Err(format!("HISTORY_END status {status}"));
                }
                if epoch == 0 {
                    return Err("HISTORY_END epoch 0".into());
                }
            }
            f
        }
        0x8F => {
            let code = r.u16()?;
            let fatal = r.flag()?;
            let detail = r.rest_str()?;
            if detail.len() > MAX_DETAIL {
                return Err(format!(
                    "ERROR detail of {} bytes breaks the model's bound of {MAX_DETAIL}",
                    detail.len()
                ));
            }
            Frame::Error { code, fatal }
        }
        other => return Err(format!("server opcode 0x{other:02x}")),
    };
    if !r.b.is_empty() {
        return Err(format!("{} bytes left over", r.b.len()));
    }
    Ok(f)
}

/// Splits one connection's output of one round into frames: whole frames only, each payload
/// within `max_frame + 128`, each strictly decodable.
pub fn decode_stream(mut bytes: &[u8], max_frame: u32) -> Result<Vec<Frame>, String> {
    let limit = max_frame as usize + SLACK;
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < HEADER {
            return Err(format!("output ends inside a header: {bytes:02x?}"));
        }
        if bytes[..2] != MAGIC || bytes[2] != VERSION {
            return Err(format!("bad header {:02x?}", &bytes[..HEADER]));
        }
        let n = u32::from_be_bytes(bytes[4..8].try_into().unwrap()) as usize;
        if n > limit {
            return Err(format!(
                "server payload of {n} bytes exceeds max_frame + 128"
            ));
        }
        if bytes.len() < HEADER + n {
            return Err("output ends inside a payload".into());
        }
        let f = decode(bytes[3], &bytes[HEADER..HEADER + n])
            .map_err(|e| format!("frame 0x{:02x}: {e}", bytes[3]))?;
        out.push(f);
        bytes = &bytes[HEADER + n..];
    }
    Ok(out)
}
