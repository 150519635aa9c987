//! The reference model: the chat semantics of docs/PROTOCOL.md, written as plainly as possible
//! with `BTreeMap`s and `Vec`s and without looking at how the core does it. It consumes the same
//! client byte streams as the core (its own frame parser included) and says, for each step,
//! which frames every connection must receive, in which order, and which connections must be
//! closed, and why.
//!
//! Where the spec leaves a choice to the server, the model says so instead of guessing:
//! - the order of one QUIT's or close's PRESENCE frames across the leaver's rooms is free
//!   ([`Item::AnyOrder`]);
//! - how a WHO is split into ROSTER frames, and the order of its nicks, is free
//!   ([`Item::Roster`] holds the sorted nick multiset);
//! - timers due at the same tick may fire in any order: [`Model::tick`] takes the order in
//!   which the core closed connections and ended held sessions (after checking that the set is
//!   exactly the due one) and lets PINGs float;
//! - whether a connection crosses max-pending is decided on byte counts; an ERROR's detail (free
//!   text) makes its size a range, so when a sender's count straddles the limit the model forks
//!   ([`Model::data`] returns every possible outcome) and the harness keeps the ones that match.
//!
//! Continuity (section 12) is modelled from the spec too: a session lost without QUIT is held
//! for the resume window (still a member, nick taken, no PRESENCE, MESSAGEs not delivered,
//! WHISPERs kept), resumed by a HELLO with its token, or ended with PRESENCE gone when the
//! window passes; each room keeps its last `history` MESSAGEs from its creation on (a room
//! created again under the name of one that closed after messages knows those are lost),
//! within an age and a byte cap over everything kept (entries cost their frame plus
//! [`ENTRY_OVERHEAD`], the oldest go first); HISTORY answers with what a member did not
//! receive live, within its `since`, `before` and `limit`, the answers to one batch of input
//! sharing max-pending / 2 bytes (at least one message each while any is left).

use std::collections::{BTreeMap, VecDeque};

use super::wire::{
    self, COMPLETE, Frame, GAP, GONE, HEADER, JOIN, LEAVE, MAX_DETAIL, MORE, QUIT, op,
};

/// The core's settings, as the model sees them (all durations in ms, multiples of the tick).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub max_frame: u32,
    pub max_rooms: usize,
    pub presence_limit: usize,
    pub heartbeat_ms: u64,
    pub idle_ms: u64,
    pub hello_ms: u64,
    pub max_pending: usize,
    pub tick_ms: u64,
    /// Section 12.1's resume window (0: off).
    pub resume_ms: u64,
    /// MESSAGEs kept per room (`--history`).
    pub history: usize,
    /// `--history-age` (0: none).
    pub history_age_ms: u64,
    /// `--history-bytes`.
    pub history_bytes: usize,
    /// Several nodes through Redis (PROTOCOL.md section 10; tests/model_cluster.rs): a
    /// room's history outlives the room (10.2), msg_ids are the cluster's (10.1: the model
    /// numbers messages 1, 2, 3... and the harness binds each number to the id the cluster
    /// gave it, [`Model::ids`]), and the ERROR for a SAY refused right after another SAY may
    /// come before that SAY's MESSAGE ([`Item::Float`]).
    pub cluster: bool,
}

/// The history epoch the harness gives the core (`Chat::set_history_epoch`).
pub const EPOCH: u64 = 0x5A17_C0DE_0000_002A;

/// What a kept entry costs beyond its frame, against `--history-bytes` (the core's documented
/// accounting: frame length + 128).
pub const ENTRY_OVERHEAD: usize = 128;

/// Whispers kept per held session: 100, or `--history` if larger (section 12.1).
const MIN_HELD_WHISPERS: usize = 100;

/// Why a connection was closed (the closes the core reports through `poll_close`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Close {
    Quit,
    Protocol(u16),
    Idle,
    Hello,
    Slow,
    TakenOver,
    Shutdown,
    Kicked,
}

/// What one connection must receive next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Exactly this frame.
    One(Frame),
    /// These frames, in any order (one departure's PRESENCE across several rooms).
    AnyOrder(Vec<Frame>),
    /// One WHO's answer: ROSTER frames for `room` listing exactly `nicks` (sorted here).
    Roster { room: String, nicks: Vec<String> },
    /// In a cluster (PROTOCOL.md 10.2): the ERROR (`bad_room`, `not_in_room`) for a SAY the
    /// node refuses itself, sent right after another SAY: it may come before the `past`
    /// items just before it (the MESSAGEs and such ERRORs of the SAYs right before it).
    Float { frame: Frame, past: usize },
}

/// What a step must produce.
#[derive(Debug, Clone, Default)]
pub struct Obs {
    /// Per conn_id, in order.
    pub out: BTreeMap<u64, Vec<Item>>,
    /// In order.
    pub closes: Vec<(u64, Close)>,
    /// The value an application command returns.
    pub ret: Option<bool>,
    /// Bytes queued per connection in this round: (at least, at most).
    bytes: BTreeMap<u64, (usize, usize)>,
    /// Everything queued while handling the current client frame, to count each encoded frame
    /// once however many recipients it has (the core encodes a broadcast once).
    step: Vec<(Item, (usize, usize))>,
}

impl Obs {
    fn push(&mut self, to: u64, item: Item, cost: (usize, usize)) {
        self.step.push((item.clone(), cost));
        self.out.entry(to).or_default().push(item);
        let b = self.bytes.entry(to).or_default();
        b.0 += cost.0;
        b.1 += cost.1;
    }

    /// A frame encoded for nobody (a WHISPER kept for a held session): it counts against the
    /// sender's max-pending like any output the core encodes.
    fn produce(&mut self, f: Frame) {
        let cost = frame_cost(&f);
        self.step.push((Item::One(f), cost));
    }

    fn send(&mut self, to: u64, f: Frame) {
        let cost = frame_cost(&f);
        self.push(to, Item::One(f), cost);
    }

    /// One event's frames: per recipient, one frame or several in any order.
    fn send_group(&mut self, group: BTreeMap<u64, Vec<Frame>>) {
        for (to, mut frames) in group {
            let cost = frames
                .iter()
                .map(frame_cost)
                .fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
            let item = if frames.len() == 1 {
                Item::One(frames.pop().unwrap())
            } else {
                frames.sort();
                Item::AnyOrder(frames)
            };
            self.push(to, item, cost);
        }
    }

    /// Bytes encoded while handling one client frame: identical frames queued for several
    /// recipients by one frame's handling are one encoding.
    fn take_step_cost(&mut self) -> (usize, usize) {
        let mut seen: Vec<&Item> = Vec::new();
        let mut total = (0, 0);
        for (item, cost) in &self.step {
            if !seen.contains(&item) {
                seen.push(item);
                total.0 += cost.0;
                total.1 += cost.1;
            }
        }
        self.step.clear();
        total
    }

    /// Drops what was queued for `to` in this round (a slow consumer's backlog).
    fn discard(&mut self, to: u64) {
        self.out.remove(&to);
        self.bytes.remove(&to);
    }
}

/// An application's text as the core sends it: at most `max` bytes, cut at a character
/// boundary (a client's text could not be longer than max_frame either).
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Bytes either side of the slow-consumer threshold within which the model accepts either
/// outcome.
const SLOW_BAND: usize = 512;

fn s(b: &str) -> usize {
    2 + b.len()
}

/// Bytes a frame takes on the wire, as a range (an ERROR's detail is free text).
fn frame_cost(f: &Frame) -> (usize, usize) {
    let exact = |n: usize| (HEADER + n, HEADER + n);
    match f {
        Frame::Welcome { nick, .. } => exact(8 + 16 + 4 + 4 + s(nick)),
        Frame::Message {
            room, from, text, ..
        } => exact(8 + s(room) + s(from) + text.len()),
        Frame::Whisper { from, text, .. } => exact(8 + s(from) + text.len()),
        Frame::Presence { room, nick, .. } => exact(1 + s(room) + s(nick)),
        Frame::Roster { room, nicks, .. } => {
            exact(s(room) + 5 + nicks.iter().map(|n| s(n)).sum::<usize>())
        }
        Frame::Ping => exact(8),
        Frame::Pong(d) => exact(d.len()),
        Frame::Error { .. } => (HEADER + 3, HEADER + 3 + MAX_DETAIL),
        Frame::History {
            room, from, text, ..
        } => exact(8 + s(room) + s(from) + text.len()),
        Frame::HistoryWhisper { from, text, .. } => exact(8 + s(from) + text.len()),
        Frame::HistoryEnd { room, .. } => exact(s(room) + 8 + 1 + 4),
    }
}

// ----- names (section 1.4, 5.1, 5.2) -----

/// The 25 White_Space code points of section 1.4.
fn is_space(c: char) -> bool {
    matches!(c as u32,
        0x09..=0x0D | 0x20 | 0x85 | 0xA0 | 0x1680 | 0x2000..=0x200A | 0x2028 | 0x2029 | 0x202F
        | 0x205F | 0x3000)
}

fn is_control(c: char) -> bool {
    matches!(c as u32, 0..=0x1F | 0x7F..=0x9F)
}

/// Unicode General_Category Cf (format characters), from the Unicode 15.1 tables.
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
        | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

fn valid_name(n: &str, max: usize) -> bool {
    !n.is_empty()
        && n.len() <= max
        && !n
            .chars()
            .any(|c| is_space(c) || is_control(c) || is_format(c))
}

pub fn valid_nick(n: &str) -> bool {
    valid_name(n, 32)
}

pub fn valid_room(n: &str) -> bool {
    valid_name(n, 64)
}

/// ASCII case folding: only A-Z change.
fn fold(n: &str) -> Vec<u8> {
    n.bytes()
        .map(|b| if b.is_ascii_uppercase() { b + 32 } else { b })
        .collect()
}

// ----- client messages (section 2.4, 3.1) -----

enum Msg {
    Hello {
        nick: String,
        token: Option<[u8; 16]>,
    },
    Join(String),
    Leave(String),
    Say(String, String),
    Whisper(String, String),
    Who(String),
    Ping(Vec<u8>),
    Pong,
    Quit,
    History(Query),
}

/// A HISTORY request's fields (section 12.2).
struct Query {
    room: String,
    epoch: u64,
    since: u64,
    before: u64,
    limit: u32,
}

/// Decodes a payload field by field; `None` is bad_payload.
fn decode(opcode: u8, p: &[u8]) -> Option<Msg> {
    fn str_at(p: &[u8]) -> Option<(String, &[u8])> {
        let n = u16::from_be_bytes([*p.first()?, *p.get(1)?]) as usize;
        let b = p.get(2..2 + n)?;
        Some((String::from_utf8(b.to_vec()).ok()?, &p[2 + n..]))
    }
    fn text(p: &[u8]) -> Option<String> {
        String::from_utf8(p.to_vec()).ok()
    }
    fn u64_at(p: &[u8]) -> Option<(u64, &[u8])> {
        Some((u64::from_be_bytes(p.get(..8)?.try_into().ok()?), &p[8..]))
    }
    fn only(p: &[u8]) -> Option<String> {
        let (s, rest) = str_at(p)?;
        rest.is_empty().then_some(s)
    }
    Some(match opcode {
        op::HELLO => {
            let (nick, rest) = str_at(p)?;
            let token = match rest.len() {
                0 => None,
                16 => Some(rest.try_into().unwrap()),
                _ => return None,
            };
            Msg::Hello { nick, token }
        }
        op::JOIN => Msg::Join(only(p)?),
        op::LEAVE => Msg::Leave(only(p)?),
        op::SAY => {
            let (room, rest) = str_at(p)?;
            Msg::Say(room, text(rest)?)
        }
        op::WHISPER => {
            let (nick, rest) = str_at(p)?;
            Msg::Whisper(nick, text(rest)?)
        }
        op::WHO => Msg::Who(only(p)?),
        op::PING => Msg::Ping(p.to_vec()),
        op::PONG => Msg::Pong,
        op::QUIT => {
            text(p)?;
            Msg::Quit
        }
        op::HISTORY => {
            let (room, p) = str_at(p)?;
            let (epoch, p) = u64_at(p)?;
            let (since, p) = u64_at(p)?;
            let (before, p) = u64_at(p)?;
            if p.len() != 4 {
                return None;
            }
            let limit = u32::from_be_bytes(p.try_into().ok()?);
            Msg::History(Query {
                room,
                epoch,
                since,
                before,
                limit,
            })
        }
        _ => unreachable!(),
    })
}

// ----- the model -----

/// A session's place in a room: an open connection's (by client), or a held session's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Conn(usize),
    Held(u64),
}

/// A room member as the harness compares it with the core: an open connection, or a session
/// held in its resume window (known by its nick; its id is no connection's).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Member {
    Open(u64),
    Held(String),
}

/// One kept MESSAGE (a room's) or WHISPER (a held session's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: u64,
    /// When it was kept (ms).
    at: u64,
    frame: Frame,
    /// The frame's bytes on the wire.
    len: usize,
}

/// A room's kept MESSAGEs, or a session's kept WHISPERs, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Stream {
    entries: VecDeque<Entry>,
    /// The newest msg_id of this stream that is not kept (0: none lost).
    floor: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Room {
    /// Members, each with its mark: the msg_id counter when it started receiving the room live
    /// (its JOIN, or the HELLO that resumed its session).
    members: BTreeMap<Who, u64>,
    history: Stream,
}

/// Where a stream lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Room(String),
    Conn(usize),
    Held(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Conn {
    id: u64,
    welcomed: bool,
    nick: String,
    token: u128,
    opened: u64,
    last_rx: u64,
    pinged: bool,
    /// Received bytes not yet forming a whole frame.
    inbuf: Vec<u8>,
    /// WHISPERs kept while the session was held (they follow the session).
    whispers: Option<Stream>,
}

/// A session held in its resume window (section 12.1).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    nick: String,
    token: u128,
    /// When the window ends (ms).
    until: u64,
    whispers: Option<Stream>,
}

/// Kept entries evicted, by cause (as `Chat::history_evictions` counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Evicted {
    pub count: u64,
    pub age: u64,
    pub bytes: u64,
}

/// What ended in a tick, in the order the core did it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Act {
    /// A connection closed by a timer (hello or idle timeout).
    Close(u64, Close),
    /// The window of the held session with this nick passed.
    Expire(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub cfg: Config,
    /// ms since the start.
    pub now: u64,
    /// Open connections by client (= slot).
    conns: BTreeMap<usize, Conn>,
    /// Held sessions, by a number of the model's own.
    held: BTreeMap<u64, Held>,
    next_held: u64,
    rooms: BTreeMap<String, Room>,
    /// Rooms that closed after messages: the newest msg_id each had (section 12.3).
    closed: BTreeMap<String, u64>,
    /// In a cluster, the history of rooms that have no member now: it outlives the room
    /// (PROTOCOL.md 10.2) and is the room's again when it is created again.
    kept_rooms: BTreeMap<String, Stream>,
    /// In a cluster: the msg_id the cluster gave each of the model's numbers (filled in by
    /// the harness as frames show them). HISTORY's `since` and `before` are the cluster's.
    pub ids: BTreeMap<u64, u64>,
    /// In a cluster: where the current run of consecutive SAYs of this batch of input began
    /// in the sender's output (for [`Item::Float`]).
    say_run: Option<usize>,
    next_msg_id: u64,
    /// Tokens come from a counter: 1, 2, 3... as 16 big-endian bytes.
    next_token: u128,
    generations: Vec<u32>,
    shutting_down: bool,
    /// The last token each client was given (live or not).
    pub last_token: Vec<Option<u128>>,
    /// The nick of the last session welcomed on each client (live or not).
    pub last_nick: Vec<Option<String>>,
    pub evicted: Evicted,
}

pub fn token_bytes(t: u128) -> [u8; 16] {
    t.to_be_bytes()
}

impl Model {
    pub fn new(cfg: Config, clients: usize) -> Model {
        Model {
            cfg,
            now: 0,
            conns: BTreeMap::new(),
            held: BTreeMap::new(),
            next_held: 0,
            rooms: BTreeMap::new(),
            closed: BTreeMap::new(),
            kept_rooms: BTreeMap::new(),
            ids: BTreeMap::new(),
            say_run: None,
            next_msg_id: 1,
            next_token: 1,
            generations: vec![0; clients],
            shutting_down: false,
            last_token: vec![None; clients],
            last_nick: vec![None; clients],
            evicted: Evicted::default(),
        }
    }

    // ----- what the harness checks besides frames -----

    pub fn is_open(&self, client: usize) -> bool {
        self.conns.contains_key(&client)
    }

    /// The conn_id of the client's latest connection, open or not.
    pub fn conn_id(&self, client: usize) -> Option<u64> {
        let g = self.generations[client];
        (g > 0).then_some((g as u64) << 32 | client as u64)
    }

    /// The msg_id the next SAY or WHISPER gets.
    pub fn next_msg_id(&self) -> u64 {
        self.next_msg_id
    }

    /// (conn_id, nick if welcomed) of every open connection.
    pub fn open_conns(&self) -> Vec<(u64, Option<&str>)> {
        self.conns
            .values()
            .map(|c| (c.id, c.welcomed.then_some(&*c.nick)))
            .collect()
    }

    /// The nicks of the sessions held in their resume window.
    pub fn held_nicks(&self) -> Vec<&str> {
        self.held.values().map(|h| &*h.nick).collect()
    }

    /// Every room with its members, sorted.
    pub fn rooms(&self) -> Vec<(&str, Vec<Member>)> {
        self.rooms
            .iter()
            .map(|(r, room)| {
                let mut ms: Vec<Member> = room
                    .members
                    .keys()
                    .map(|&w| match w {
                        Who::Conn(c) => Member::Open(self.conns[&c].id),
                        Who::Held(h) => Member::Held(self.held[&h].nick.clone()),
                    })
                    .collect();
                ms.sort();
                (&**r, ms)
            })
            .collect()
    }

    /// Entries kept (room messages and held whispers) and what they cost against
    /// `--history-bytes`.
    pub fn kept(&self) -> (usize, usize) {
        self.streams()
            .flat_map(|(_, s)| s.entries.iter())
            .fold((0, 0), |(n, b), e| (n + 1, b + e.len + ENTRY_OVERHEAD))
    }

    /// Bytes of an incomplete frame the client has sent.
    pub fn buffered(&self, client: usize) -> usize {
        self.conns.get(&client).map_or(0, |c| c.inbuf.len())
    }

    /// When the next timer event is due (ms), if any: a connection's timeout or heartbeat, the
    /// end of a resume window, a kept entry coming of age.
    pub fn next_deadline(&self) -> Option<u64> {
        let cfg = &self.cfg;
        let conns = self.conns.values().map(|c| {
            if !c.welcomed {
                c.opened + cfg.hello_ms
            } else if c.pinged {
                c.last_rx + cfg.idle_ms
            } else {
                c.last_rx + cfg.heartbeat_ms
            }
        });
        let held = self.held.values().map(|h| h.until);
        let aging = self
            .oldest()
            .filter(|_| cfg.history_age_ms > 0)
            .map(|(_, at, _)| at + cfg.history_age_ms);
        conns.chain(held).chain(aging).min()
    }

    fn client_of(&self, id: u64) -> Option<usize> {
        self.conns.iter().find(|(_, c)| c.id == id).map(|(&k, _)| k)
    }

    /// The session holding `nick` (ASCII case folded): welcomed and open, or held.
    fn nick_holder(&self, nick: &str) -> Option<Who> {
        let f = fold(nick);
        let open = self
            .conns
            .iter()
            .find(|(_, c)| c.welcomed && fold(&c.nick) == f)
            .map(|(&k, _)| Who::Conn(k));
        open.or_else(|| {
            self.held
                .iter()
                .find(|(_, h)| fold(&h.nick) == f)
                .map(|(&h, _)| Who::Held(h))
        })
    }

    fn nick_of(&self, who: Who) -> &str {
        match who {
            Who::Conn(c) => &self.conns[&c].nick,
            Who::Held(h) => &self.held[&h].nick,
        }
    }

    fn rooms_of(&self, who: Who) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.members.contains_key(&who))
            .map(|(r, _)| r.clone())
            .collect()
    }

    fn is_member(&self, room: &str, client: usize) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.members.contains_key(&Who::Conn(client)))
    }

    fn id(&self, client: usize) -> u64 {
        self.conns[&client].id
    }

    fn error(&self, obs: &mut Obs, client: usize, code: u16, fatal: bool) {
        obs.send(self.id(client), Frame::Error { code, fatal });
    }

    // ----- kept messages (section 12) -----

    fn per_held(&self) -> usize {
        self.cfg.history.max(MIN_HELD_WHISPERS)
    }

    fn streams(&self) -> impl Iterator<Item = (Key, &Stream)> {
        let rooms = self
            .rooms
            .iter()
            .map(|(r, room)| (Key::Room(r.clone()), &room.history));
        let conns = self
            .conns
            .iter()
            .filter_map(|(&k, c)| Some((Key::Conn(k), c.whispers.as_ref()?)));
        let held = self
            .held
            .iter()
            .filter_map(|(&h, s)| Some((Key::Held(h), s.whispers.as_ref()?)));
        rooms.chain(conns).chain(held)
    }

    fn stream_mut(&mut self, key: &Key) -> &mut Stream {
        match key {
            Key::Room(r) => &mut self.rooms.get_mut(r).unwrap().history,
            Key::Conn(k) => self
                .conns
                .get_mut(k)
                .unwrap()
                .whispers
                .get_or_insert_with(Stream::default),
            Key::Held(h) => self
                .held
                .get_mut(h)
                .unwrap()
                .whispers
                .get_or_insert_with(Stream::default),
        }
    }

    /// The oldest kept entry of all: (msg_id, when kept, its stream).
    fn oldest(&self) -> Option<(u64, u64, Key)> {
        self.streams()
            .filter_map(|(k, s)| s.entries.front().map(|e| (e.id, e.at, k)))
            .min_by_key(|&(id, ..)| id)
    }

    /// Keeps `f` (a MESSAGE or WHISPER just sent) in the stream `key`, at most `cap` there;
    /// then the age limit and the byte cap over everything kept.
    fn keep(&mut self, key: Key, cap: usize, f: Frame) {
        let id = match f {
            Frame::Message { msg_id, .. } | Frame::Whisper { msg_id, .. } => msg_id,
            _ => unreachable!(),
        };
        let len = frame_cost(&f).0;
        let (now, max_bytes) = (self.now, self.cfg.history_bytes);
        let s = self.stream_mut(&key);
        if cap == 0 || max_bytes == 0 {
            s.floor = s.floor.max(id);
            return;
        }
        s.entries.push_back(Entry {
            id,
            at: now,
            frame: f,
            len,
        });
        let mut evicted = 0;
        while s.entries.len() > cap {
            let e = s.entries.pop_front().unwrap();
            s.floor = s.floor.max(e.id);
            evicted += 1;
        }
        self.evicted.count += evicted;
        self.trim();
    }

    /// Evicts, oldest first over every stream, what is past the age limit or beyond the byte
    /// cap.
    fn trim(&mut self) {
        while let Some((_, at, key)) = self.oldest() {
            let age = self.cfg.history_age_ms;
            let old = age > 0 && at + age <= self.now;
            if !old && self.kept().1 <= self.cfg.history_bytes {
                break;
            }
            let s = self.stream_mut(&key);
            let e = s.entries.pop_front().unwrap();
            s.floor = s.floor.max(e.id);
            if old {
                self.evicted.age += 1;
            } else {
                self.evicted.bytes += 1;
            }
        }
    }

    // ----- inputs -----

    /// A new connection for `client` (whose previous one, if any, is closed).
    pub fn open(&mut self, client: usize) -> Obs {
        assert!(!self.is_open(client));
        self.generations[client] += 1;
        let id = self.conn_id(client).unwrap();
        let mut obs = Obs::default();
        if self.shutting_down {
            obs.send(
                id,
                Frame::Error {
                    code: 19,
                    fatal: true,
                },
            );
            obs.closes.push((id, Close::Shutdown));
            return obs;
        }
        self.conns.insert(
            client,
            Conn {
                id,
                welcomed: false,
                nick: String::new(),
                token: 0,
                opened: self.now,
                last_rx: self.now,
                pinged: false,
                inbuf: Vec::new(),
                whispers: None,
            },
        );
        obs
    }

    /// Bytes from `client`, in the chunks the transport delivered (each one batch of input):
    /// every possible outcome (more than one only when a max-pending decision depends on
    /// ERROR details).
    pub fn data(&self, client: usize, chunks: &[&[u8]]) -> Vec<(Model, Obs)> {
        let mut start = self.clone();
        start.say_run = None;
        let mut states = vec![(start, Obs::default())];
        for chunk in chunks {
            let mut next = Vec::new();
            for (mut m, mut obs) in states {
                let mut forks = Vec::new();
                m.feed(client, chunk, &mut obs, &mut forks);
                next.push((m, obs));
                next.extend(forks);
            }
            states = next;
        }
        states
    }

    /// One batch of input (a `handle_data`).
    fn feed(&mut self, client: usize, bytes: &[u8], obs: &mut Obs, forks: &mut Vec<(Model, Obs)>) {
        let now = self.now;
        let max_frame = self.cfg.max_frame;
        let Some(c) = self.conns.get_mut(&client) else {
            return; // a closed connection: ignored
        };
        if bytes.is_empty() {
            return;
        }
        c.last_rx = now;
        c.pinged = false;
        c.inbuf.extend_from_slice(bytes);
        // Section 8.1 as the core applies it within one batch of input: output encoded (each
        // frame once) beyond twice the input consumed plus max-pending is a slow consumer.
        let mut consumed = 0usize;
        let mut produced = (0usize, 0usize);
        // Section 12.2: the HISTORY answers of one batch carry max-pending / 2 bytes of frames
        // in all.
        let mut replay = self.cfg.max_pending / 2;
        obs.step.clear();
        loop {
            let c = &self.conns[&client];
            let b = &c.inbuf;
            // Section 2.3: the header is judged as its bytes arrive.
            let fatal =
                if b.first().is_some_and(|&x| x != 0x43) || b.get(1).is_some_and(|&x| x != 0x4C) {
                    Some(1)
                } else if b.get(2).is_some_and(|&x| x != 1) {
                    Some(2)
                } else if b.len() >= HEADER
                    && u32::from_be_bytes(b[4..8].try_into().unwrap()) > max_frame
                {
                    Some(3)
                } else {
                    None
                };
            if let Some(code) = fatal {
                self.fatal(client, code, Close::Protocol(code), obs);
                return;
            }
            if b.len() < HEADER {
                return;
            }
            let n = u32::from_be_bytes(b[4..8].try_into().unwrap()) as usize;
            if b.len() < HEADER + n {
                return;
            }
            let opcode = b[3];
            let payload = b[HEADER..HEADER + n].to_vec();
            self.conns
                .get_mut(&client)
                .unwrap()
                .inbuf
                .drain(..HEADER + n);
            self.frame(client, opcode, &payload, &mut replay, obs);
            consumed += HEADER + n;
            let step = obs.take_step_cost();
            produced.0 += step.0;
            produced.1 += step.1;
            if !self.conns.contains_key(&client) {
                return;
            }
            // The model's byte accounting of an ERROR's free-text detail and of a split
            // ROSTER is approximate, so near the threshold either outcome is accepted.
            let max = 2 * consumed + self.cfg.max_pending;
            if produced.0 > max + SLOW_BAND {
                self.slow(client, obs);
                return;
            }
            if produced.1 + SLOW_BAND > max {
                let (mut m, mut o) = (self.clone(), obs.clone());
                m.slow(client, &mut o);
                forks.push((m, o));
            }
        }
    }

    /// One whole frame (section 4.3's order of checks).
    fn frame(
        &mut self,
        client: usize,
        opcode: u8,
        payload: &[u8],
        replay: &mut usize,
        obs: &mut Obs,
    ) {
        let welcomed = self.conns[&client].welcomed;
        // Consecutive SAYs (section 10.2's exception): where their run began in the
        // sender's output.
        let run = self.say_run.take();
        if opcode == op::SAY {
            let id = self.id(client);
            self.say_run = Some(run.unwrap_or_else(|| obs.out.get(&id).map_or(0, Vec::len)));
        }
        if !(op::HELLO..=op::HISTORY).contains(&opcode) {
            return self.error(obs, client, 4, false);
        }
        if !welcomed && !matches!(opcode, op::HELLO | op::PING | op::QUIT) {
            return self.error(obs, client, 6, false);
        }
        let Some(msg) = decode(opcode, payload) else {
            if let (Some(start), op::SAY, true) = (run, opcode, self.cfg.cluster) {
                // A malformed SAY right after another SAY: the node refuses it itself too
                // (tests/model_cluster.rs decides whether its ERROR may float).
                let id = self.id(client);
                let f = Frame::Error {
                    code: 5,
                    fatal: false,
                };
                let past = obs.out.get(&id).map_or(0, Vec::len) - start;
                let cost = frame_cost(&f);
                return obs.push(id, Item::Float { frame: f, past }, cost);
            }
            return self.error(obs, client, 5, false);
        };
        let id = self.id(client);
        match msg {
            Msg::Hello { .. } if welcomed => self.error(obs, client, 7, false),
            Msg::Hello { nick, token } => self.hello(client, &nick, token, obs),
            Msg::Join(room) => self.join(client, room, obs),
            Msg::Leave(room) => self.leave(client, &room, obs),
            Msg::Say(room, text) => {
                let code = if !valid_room(&room) {
                    10
                } else if !self.is_member(&room, client) {
                    11
                } else {
                    0
                };
                if code != 0 {
                    let f = Frame::Error { code, fatal: false };
                    return match run {
                        // PROTOCOL.md 10.2: right after another SAY, this ERROR may come
                        // before that SAY's MESSAGE.
                        Some(start) if self.cfg.cluster => {
                            let past = obs.out.get(&id).map_or(0, Vec::len) - start;
                            let cost = frame_cost(&f);
                            obs.push(id, Item::Float { frame: f, past }, cost);
                        }
                        _ => obs.send(id, f),
                    };
                }
                let from = self.conns[&client].nick.clone();
                self.broadcast(&room, &from, &text, obs);
            }
            Msg::Whisper(target, text) => {
                let Some(to) = self.nick_holder(&target) else {
                    return self.error(obs, client, 13, false);
                };
                let from = self.conns[&client].nick.clone();
                self.deliver_whisper(to, &from, &text, obs);
            }
            Msg::Who(room) => {
                if !valid_room(&room) {
                    return self.error(obs, client, 10, false);
                }
                let mut nicks: Vec<String> = self
                    .rooms
                    .get(&room)
                    .map(|r| {
                        r.members
                            .keys()
                            .map(|&w| self.nick_of(w).to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                nicks.sort();
                let cost = self.roster_cost(&room, &nicks);
                obs.push(id, Item::Roster { room, nicks }, cost);
            }
            Msg::Ping(data) => obs.send(id, Frame::Pong(data)),
            Msg::Pong => {}
            Msg::Quit => {
                self.end_session(Who::Conn(client), Some(QUIT), obs);
                obs.closes.push((id, Close::Quit));
            }
            Msg::History(q) => self.history(client, q, replay, obs),
        }
    }

    /// Bytes of a WHO's answer: exact when it fits one frame, else a range.
    fn roster_cost(&self, room: &str, nicks: &[String]) -> (usize, usize) {
        let per_frame = HEADER + s(room) + 5;
        let all: usize = nicks.iter().map(|n| s(n)).sum();
        let budget = self.cfg.max_frame as usize + wire::SLACK;
        if per_frame - HEADER + all <= budget {
            (per_frame + all, per_frame + all)
        } else {
            (2 * per_frame + all, nicks.len() * per_frame + all)
        }
    }

    fn hello(&mut self, client: usize, nick: &str, token: Option<[u8; 16]>, obs: &mut Obs) {
        // Section 4.5 and 12.1: a token that matches a live session, open or held, resumes
        // it, whatever the nick.
        let old = token.and_then(|t| {
            let open = self
                .conns
                .iter()
                .find(|(_, c)| c.welcomed && token_bytes(c.token) == t)
                .map(|(&k, _)| Who::Conn(k));
            open.or_else(|| {
                self.held
                    .iter()
                    .find(|(_, h)| token_bytes(h.token) == t)
                    .map(|(&h, _)| Who::Held(h))
            })
        });
        if let Some(old) = old {
            let (nick, whispers) = match old {
                Who::Conn(k) => {
                    let prev = self.conns.remove(&k).unwrap();
                    obs.send(
                        prev.id,
                        Frame::Error {
                            code: 18,
                            fatal: true,
                        },
                    );
                    obs.closes.push((prev.id, Close::TakenOver));
                    (prev.nick, prev.whispers)
                }
                Who::Held(h) => {
                    let prev = self.held.remove(&h).unwrap();
                    (prev.nick, prev.whispers)
                }
            };
            // From now on this connection receives the rooms live (section 12.2).
            let mark = self.next_msg_id;
            for room in self.rooms.values_mut() {
                if room.members.remove(&old).is_some() {
                    room.members.insert(Who::Conn(client), mark);
                }
            }
            self.conns.get_mut(&client).unwrap().whispers = whispers;
            return self.welcome(client, nick, obs);
        }
        if !valid_nick(nick) {
            return self.error(obs, client, 8, false);
        }
        if self.nick_holder(nick).is_some() {
            return self.error(obs, client, 9, false);
        }
        self.welcome(client, nick.to_string(), obs);
    }

    fn welcome(&mut self, client: usize, nick: String, obs: &mut Obs) {
        let token = self.next_token;
        self.next_token += 1;
        self.last_token[client] = Some(token);
        self.last_nick[client] = Some(nick.clone());
        let (max_frame, heartbeat_ms) = (self.cfg.max_frame, self.cfg.heartbeat_ms as u32);
        let c = self.conns.get_mut(&client).unwrap();
        c.welcomed = true;
        c.nick = nick.clone();
        c.token = token;
        let f = Frame::Welcome {
            conn_id: c.id,
            token: token_bytes(token),
            max_frame,
            heartbeat_ms,
            nick,
        };
        obs.send(c.id, f);
    }

    /// PRESENCE `kind` about `who` in `room` (section 5.4), `who` still a member.
    fn presence(&self, room: &str, kind: u8, who: Who, obs: &mut Obs) {
        let mut group = BTreeMap::new();
        self.presence_into(room, kind, who, &mut group);
        obs.send_group(group);
    }

    /// Held members count towards the presence limit but receive nothing (no connection).
    fn presence_into(&self, room: &str, kind: u8, who: Who, group: &mut BTreeMap<u64, Vec<Frame>>) {
        let members = &self.rooms[room].members;
        let f = Frame::Presence {
            kind,
            room: room.to_string(),
            nick: self.nick_of(who).to_string(),
        };
        let self_too = kind == JOIN || kind == LEAVE;
        let to_all = members.len() <= self.cfg.presence_limit;
        for &m in members.keys() {
            let Who::Conn(c) = m else { continue };
            if (m == who && self_too) || (m != who && to_all) {
                group.entry(self.conns[&c].id).or_default().push(f.clone());
            }
        }
    }

    fn join(&mut self, client: usize, room: String, obs: &mut Obs) {
        if !valid_room(&room) {
            return self.error(obs, client, 10, false);
        }
        if self.is_member(&room, client) {
            return self.error(obs, client, 12, false);
        }
        if self.rooms_of(Who::Conn(client)).len() >= self.cfg.max_rooms {
            return self.error(obs, client, 20, false);
        }
        // Section 12.3: a room's history starts when it is created. A room never seen has lost
        // nothing; one created again under the name of one that closed after messages knows
        // those are gone.
        let last = if self.rooms.contains_key(&room) {
            0
        } else {
            self.closed.remove(&room).unwrap_or(0)
        };
        let mark = self.next_msg_id;
        // In a cluster the room's history outlived it (PROTOCOL.md 10.2).
        let kept = if self.cfg.cluster {
            self.kept_rooms.remove(&room)
        } else {
            None
        };
        self.rooms
            .entry(room.clone())
            .or_insert_with(|| Room {
                members: BTreeMap::new(),
                history: kept.unwrap_or(Stream {
                    entries: VecDeque::new(),
                    floor: last,
                }),
            })
            .members
            .insert(Who::Conn(client), mark);
        self.presence(&room, JOIN, Who::Conn(client), obs);
    }

    fn leave(&mut self, client: usize, room: &str, obs: &mut Obs) {
        if !valid_room(room) {
            return self.error(obs, client, 10, false);
        }
        if !self.is_member(room, client) {
            return self.error(obs, client, 11, false);
        }
        self.presence(room, LEAVE, Who::Conn(client), obs);
        self.remove_member(room, Who::Conn(client));
    }

    /// Removes a member; a room without members is deleted, and its history with it.
    fn remove_member(&mut self, room: &str, who: Who) {
        let r = self.rooms.get_mut(room).unwrap();
        r.members.remove(&who);
        if r.members.is_empty() && self.cfg.cluster {
            let h = self.rooms.remove(room).unwrap().history;
            self.kept_rooms.insert(room.to_string(), h);
        } else if r.members.is_empty() {
            let h = &self.rooms.remove(room).unwrap().history;
            let newest = h.entries.back().map_or(h.floor, |e| e.id.max(h.floor));
            if newest > 0 {
                self.closed.insert(room.to_string(), newest);
            }
        }
    }

    fn broadcast(&mut self, room: &str, from: &str, text: &str, obs: &mut Obs) {
        let msg_id = self.next_msg_id;
        self.next_msg_id += 1;
        let f = Frame::Message {
            msg_id,
            room: room.to_string(),
            from: from.to_string(),
            text: text.to_string(),
        };
        for &m in self.rooms[room].members.keys() {
            if let Who::Conn(c) = m {
                obs.send(self.conns[&c].id, f.clone());
            }
        }
        self.keep(Key::Room(room.to_string()), self.cfg.history, f);
    }

    fn deliver_whisper(&mut self, to: Who, from: &str, text: &str, obs: &mut Obs) {
        let msg_id = self.next_msg_id;
        self.next_msg_id += 1;
        let f = Frame::Whisper {
            msg_id,
            from: from.to_string(),
            text: text.to_string(),
        };
        match to {
            Who::Conn(c) => obs.send(self.conns[&c].id, f),
            Who::Held(h) => {
                // Section 12.1: kept for the held session's HISTORY.
                obs.produce(f.clone());
                self.keep(Key::Held(h), self.per_held(), f);
            }
        }
    }

    /// HISTORY (section 12.2).
    fn history(&mut self, client: usize, q: Query, budget: &mut usize, obs: &mut Obs) {
        let whispers = q.room.is_empty();
        let me = Who::Conn(client);
        let (stream, mark) = if whispers {
            (self.conns[&client].whispers.as_ref(), u64::MAX)
        } else {
            if !valid_room(&q.room) {
                return self.error(obs, client, 10, false);
            }
            if !self.is_member(&q.room, client) {
                return self.error(obs, client, 11, false);
            }
            // Only what was sent before this connection received the room live.
            let room = &self.rooms[&q.room];
            let mark = room.members[&me];
            (Some(&room.history), mark)
        };
        // A `since` of another server run is treated as 0, and the answer is at least gap.
        let other_run = q.epoch != 0 && q.epoch != EPOCH && q.since > 0;
        let since = if other_run { 0 } else { q.since };
        // `since` and `before` are msg_ids as the client saw them (the cluster's, in a
        // cluster); the mark is the model's own number.
        let ids = &self.ids;
        let cluster = self.cfg.cluster;
        let seen = |id: u64| {
            if cluster {
                *ids.get(&id)
                    .unwrap_or_else(|| panic!("message {id} has no cluster msg_id yet"))
            } else {
                id
            }
        };
        let in_range = |id: u64| {
            (since == 0 || since < seen(id)) && id < mark && (q.before == 0 || seen(id) < q.before)
        };
        let cap = if whispers {
            self.per_held()
        } else {
            self.cfg.history
        };
        let limit = (q.limit as usize).min(cap);
        let none = Stream::default();
        let stream = stream.unwrap_or(&none);
        let range: Vec<&Entry> = stream.entries.iter().filter(|e| in_range(e.id)).collect();
        // The newest of the range: at most `limit`, at most `budget` bytes of frames, but at
        // least one message however large while any budget is left.
        let mut sent = 0;
        let mut bytes = 0;
        for e in range.iter().rev().take(limit) {
            if bytes + e.len > *budget && (sent > 0 || *budget == 0) {
                break;
            }
            bytes += e.len;
            sent += 1;
        }
        *budget = budget.saturating_sub(bytes);
        let mut status = if sent < range.len() {
            MORE
        } else if stream.floor > 0 && in_range(stream.floor) {
            GAP
        } else {
            COMPLETE
        };
        if other_run && status == COMPLETE {
            status = GAP;
        }
        let frames: Vec<Frame> = range[range.len() - sent..]
            .iter()
            .map(|e| match &e.frame {
                Frame::Message {
                    msg_id,
                    room,
                    from,
                    text,
                } => Frame::History {
                    msg_id: *msg_id,
                    room: room.clone(),
                    from: from.clone(),
                    text: text.clone(),
                },
                Frame::Whisper { msg_id, from, text } => Frame::HistoryWhisper {
                    msg_id: *msg_id,
                    from: from.clone(),
                    text: text.clone(),
                },
                _ => unreachable!(),
            })
            .collect();
        let id = self.id(client);
        for f in frames {
            obs.send(id, f);
        }
        obs.send(
            id,
            Frame::HistoryEnd {
                room: q.room,
                epoch: EPOCH,
                status,
                count: sent as u32,
            },
        );
    }

    /// Ends a session (open or held): PRESENCE `kind` (if any) to its rooms, then forgets it
    /// and what was kept for it.
    fn end_session(&mut self, who: Who, kind: Option<u8>, obs: &mut Obs) {
        let welcomed = match who {
            Who::Conn(c) => self.conns[&c].welcomed,
            Who::Held(_) => true,
        };
        if let Some(kind) = kind.filter(|_| welcomed) {
            let mut group = BTreeMap::new();
            for room in self.rooms_of(who) {
                self.presence_into(&room, kind, who, &mut group);
            }
            obs.send_group(group);
        }
        for room in self.rooms_of(who) {
            self.remove_member(&room, who);
        }
        match who {
            Who::Conn(c) => self.conns.remove(&c).map(drop),
            Who::Held(h) => self.held.remove(&h).map(drop),
        };
    }

    /// `client`'s connection is lost (`lost`: without QUIT, by the transport, idle timeout or
    /// slow consumer) or closed: with a resume window a lost welcomed session is held
    /// (section 12.1), anything else ends with PRESENCE gone.
    fn drop_conn(&mut self, client: usize, lost: bool, obs: &mut Obs) {
        let welcomed = self.conns[&client].welcomed;
        if !(lost && welcomed && self.cfg.resume_ms > 0 && !self.shutting_down) {
            return self.end_session(Who::Conn(client), Some(GONE), obs);
        }
        let c = self.conns.remove(&client).unwrap();
        let h = self.next_held;
        self.next_held += 1;
        for room in self.rooms.values_mut() {
            if let Some(mark) = room.members.remove(&Who::Conn(client)) {
                room.members.insert(Who::Held(h), mark);
            }
        }
        self.held.insert(
            h,
            Held {
                nick: c.nick,
                token: c.token,
                until: self.now + self.cfg.resume_ms,
                whispers: c.whispers,
            },
        );
    }

    /// A fatal ERROR, then the session is held or ends (PRESENCE gone), close.
    fn fatal(&mut self, client: usize, code: u16, why: Close, obs: &mut Obs) {
        let id = self.id(client);
        obs.send(id, Frame::Error { code, fatal: true });
        self.drop_conn(client, matches!(why, Close::Idle | Close::Slow), obs);
        obs.closes.push((id, why));
    }

    fn slow(&mut self, client: usize, obs: &mut Obs) {
        obs.discard(self.id(client));
        self.fatal(client, 15, Close::Slow, obs);
    }

    /// The transport holds more than max-pending of `client`'s output (section 8.1).
    pub fn slow_consumer(&mut self, client: usize) -> Obs {
        let mut obs = Obs::default();
        if self.is_open(client) {
            self.slow(client, &mut obs);
        }
        obs
    }

    /// The transport closed `client`'s connection.
    pub fn close(&mut self, client: usize) -> Obs {
        let mut obs = Obs::default();
        if self.is_open(client) {
            self.drop_conn(client, true, &mut obs);
        }
        obs
    }

    /// One tick of time. `order` is what the core's timers ended in this tick (closes and
    /// resume windows), in the core's order; the model checks it is exactly what is due and
    /// follows it.
    pub fn tick(&self, order: &[Act]) -> Result<(Model, Obs), String> {
        let mut m = self.clone();
        m.now += m.cfg.tick_ms;
        let now = m.now;
        // Kept entries come of age.
        m.trim();
        let (hb, idle, hello) = (m.cfg.heartbeat_ms, m.cfg.idle_ms, m.cfg.hello_ms);
        let mut due = Vec::new();
        let mut pings = Vec::new();
        for (&k, c) in &m.conns {
            if !c.welcomed {
                if now >= c.opened + hello {
                    due.push(Act::Close(c.id, Close::Hello));
                }
            } else if now - c.last_rx >= idle {
                due.push(Act::Close(c.id, Close::Idle));
            } else if now - c.last_rx >= hb && !c.pinged {
                pings.push(k);
            }
        }
        for h in m.held.values() {
            if now >= h.until {
                due.push(Act::Expire(h.nick.clone()));
            }
        }
        let mut got = order.to_vec();
        got.sort();
        due.sort();
        if got != due {
            return Err(format!(
                "at {now} ms the core's timers did {order:?}; the model expects exactly {due:?}"
            ));
        }
        let mut obs = Obs::default();
        for act in order {
            match act {
                Act::Close(id, why) => {
                    let k = m.client_of(*id).unwrap();
                    let code = if *why == Close::Hello { 17 } else { 16 };
                    m.fatal(k, code, *why, &mut obs);
                }
                Act::Expire(nick) => {
                    let h = m.held.iter().find(|(_, h)| h.nick == *nick).unwrap().0;
                    m.end_session(Who::Held(*h), Some(GONE), &mut obs);
                }
            }
        }
        for k in pings {
            let c = m.conns.get_mut(&k).unwrap();
            c.pinged = true;
            obs.send(c.id, Frame::Ping);
        }
        Ok((m, obs))
    }

    // ----- application commands -----

    pub fn kick(&mut self, client: usize) -> Obs {
        let mut obs = Obs {
            ret: Some(self.is_open(client)),
            ..Obs::default()
        };
        if self.is_open(client) {
            self.fatal(client, 21, Close::Kicked, &mut obs);
        }
        obs
    }

    /// `Chat::kick` of the session holding `nick` (`Chat::conn_of`): an open one is closed,
    /// a held one ends at once (PRESENCE gone, no connection to close).
    pub fn kick_nick(&mut self, nick: &str) -> Obs {
        let who = self.nick_holder(nick);
        let mut obs = Obs {
            ret: Some(who.is_some()),
            ..Obs::default()
        };
        match who {
            Some(Who::Conn(c)) => self.fatal(c, 21, Close::Kicked, &mut obs),
            Some(w) => self.end_session(w, Some(GONE), &mut obs),
            None => {}
        }
        obs
    }

    pub fn post(&mut self, room: &str, text: &str) -> Obs {
        let mut obs = Obs {
            ret: Some(self.rooms.contains_key(room)),
            ..Obs::default()
        };
        if self.rooms.contains_key(room) {
            let text = cut(text, self.cfg.max_frame as usize);
            self.broadcast(room, "", text, &mut obs);
        }
        obs
    }

    pub fn whisper(&mut self, nick: &str, text: &str) -> Obs {
        let to = self.nick_holder(nick);
        let mut obs = Obs {
            ret: Some(to.is_some()),
            ..Obs::default()
        };
        if let Some(to) = to {
            let text = cut(text, self.cfg.max_frame as usize);
            self.deliver_whisper(to, "", text, &mut obs);
        }
        obs
    }

    pub fn shutdown(&mut self) -> Obs {
        let mut obs = Obs::default();
        if self.shutting_down {
            return obs;
        }
        self.shutting_down = true;
        let clients: Vec<usize> = self.conns.keys().copied().collect();
        for k in clients {
            let id = self.id(k);
            obs.send(
                id,
                Frame::Error {
                    code: 19,
                    fatal: true,
                },
            );
            self.end_session(Who::Conn(k), None, &mut obs);
            obs.closes.push((id, Close::Shutdown));
        }
        // Held sessions end too, and nobody is told (section 12.1).
        let held: Vec<u64> = self.held.keys().copied().collect();
        for h in held {
            self.end_session(Who::Held(h), None, &mut obs);
        }
        obs
    }
}
