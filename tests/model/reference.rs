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
//! - timers due at the same tick may fire in any order: [`Model::tick`] takes the order of the
//!   closes from the core (after checking that the set is exactly the due one) and lets PINGs
//!   float;
//! - whether a connection crosses max-pending is decided on byte counts; an ERROR's detail (free
//!   text) makes its size a range, so when a sender's count straddles the limit the model forks
//!   ([`Model::data`] returns every possible outcome) and the harness keeps the ones that match.

use std::collections::{BTreeMap, BTreeSet};

use super::wire::{self, Frame, GONE, HEADER, JOIN, LEAVE, MAX_DETAIL, QUIT, op};

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
}

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
        _ => unreachable!(),
    })
}

// ----- the model -----

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub cfg: Config,
    /// ms since the start.
    pub now: u64,
    /// Open connections by client (= slot).
    conns: BTreeMap<usize, Conn>,
    /// Rooms by name: the clients that are members.
    rooms: BTreeMap<String, BTreeSet<usize>>,
    next_msg_id: u64,
    /// Tokens come from a counter: 1, 2, 3... as 16 big-endian bytes.
    next_token: u128,
    generations: Vec<u32>,
    shutting_down: bool,
    /// The last token each client was given (live or not).
    pub last_token: Vec<Option<u128>>,
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
            rooms: BTreeMap::new(),
            next_msg_id: 1,
            next_token: 1,
            generations: vec![0; clients],
            shutting_down: false,
            last_token: vec![None; clients],
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

    /// (conn_id, nick if welcomed) of every open connection.
    pub fn open_conns(&self) -> Vec<(u64, Option<&str>)> {
        self.conns
            .values()
            .map(|c| (c.id, c.welcomed.then_some(&*c.nick)))
            .collect()
    }

    /// Every room with its members' conn_ids, sorted.
    pub fn rooms(&self) -> Vec<(&str, Vec<u64>)> {
        self.rooms
            .iter()
            .map(|(r, m)| {
                let mut ids: Vec<u64> = m.iter().map(|c| self.conns[c].id).collect();
                ids.sort();
                (&**r, ids)
            })
            .collect()
    }

    /// Bytes of an incomplete frame the client has sent.
    pub fn buffered(&self, client: usize) -> usize {
        self.conns.get(&client).map_or(0, |c| c.inbuf.len())
    }

    /// When the next timer event is due (ms), if any connection is open.
    pub fn next_deadline(&self) -> Option<u64> {
        let cfg = &self.cfg;
        self.conns
            .values()
            .map(|c| {
                if !c.welcomed {
                    c.opened + cfg.hello_ms
                } else if c.pinged {
                    c.last_rx + cfg.idle_ms
                } else {
                    c.last_rx + cfg.heartbeat_ms
                }
            })
            .min()
    }

    fn client_of(&self, id: u64) -> Option<usize> {
        self.conns.iter().find(|(_, c)| c.id == id).map(|(&k, _)| k)
    }

    fn nick_holder(&self, nick: &str) -> Option<usize> {
        let f = fold(nick);
        self.conns
            .iter()
            .find(|(_, c)| c.welcomed && fold(&c.nick) == f)
            .map(|(&k, _)| k)
    }

    fn rooms_of(&self, client: usize) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, m)| m.contains(&client))
            .map(|(r, _)| r.clone())
            .collect()
    }

    fn id(&self, client: usize) -> u64 {
        self.conns[&client].id
    }

    fn error(&self, obs: &mut Obs, client: usize, code: u16, fatal: bool) {
        obs.send(self.id(client), Frame::Error { code, fatal });
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
            },
        );
        obs
    }

    /// Bytes from `client`: every possible outcome (more than one only when a max-pending
    /// decision depends on ERROR details).
    pub fn data(&self, client: usize, bytes: &[u8]) -> Vec<(Model, Obs)> {
        let mut m = self.clone();
        let mut obs = Obs::default();
        let mut forks = Vec::new();
        m.feed(client, bytes, &mut obs, &mut forks);
        forks.insert(0, (m, obs));
        forks
    }

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
            self.frame(client, opcode, &payload, obs);
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
    fn frame(&mut self, client: usize, opcode: u8, payload: &[u8], obs: &mut Obs) {
        let welcomed = self.conns[&client].welcomed;
        if !(op::HELLO..=op::QUIT).contains(&opcode) {
            return self.error(obs, client, 4, false);
        }
        if !welcomed && !matches!(opcode, op::HELLO | op::PING | op::QUIT) {
            return self.error(obs, client, 6, false);
        }
        let Some(msg) = decode(opcode, payload) else {
            return self.error(obs, client, 5, false);
        };
        let id = self.id(client);
        match msg {
            Msg::Hello { .. } if welcomed => self.error(obs, client, 7, false),
            Msg::Hello { nick, token } => self.hello(client, &nick, token, obs),
            Msg::Join(room) => self.join(client, room, obs),
            Msg::Leave(room) => self.leave(client, &room, obs),
            Msg::Say(room, text) => {
                if !valid_room(&room) {
                    return self.error(obs, client, 10, false);
                }
                if !self.rooms.get(&room).is_some_and(|m| m.contains(&client)) {
                    return self.error(obs, client, 11, false);
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
                    .map(|m| m.iter().map(|c| self.conns[c].nick.clone()).collect())
                    .unwrap_or_default();
                nicks.sort();
                let cost = self.roster_cost(&room, &nicks);
                obs.push(id, Item::Roster { room, nicks }, cost);
            }
            Msg::Ping(data) => obs.send(id, Frame::Pong(data)),
            Msg::Pong => {}
            Msg::Quit => {
                self.end_session(client, Some(QUIT), obs);
                obs.closes.push((id, Close::Quit));
            }
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
        // Section 4.5: a token that matches a live session resumes it, whatever the nick.
        let old = token.and_then(|t| {
            self.conns
                .iter()
                .find(|(_, c)| c.welcomed && token_bytes(c.token) == t)
                .map(|(&k, _)| k)
        });
        if let Some(old) = old {
            let prev = self.conns.remove(&old).unwrap();
            for members in self.rooms.values_mut() {
                if members.remove(&old) {
                    members.insert(client);
                }
            }
            obs.send(
                prev.id,
                Frame::Error {
                    code: 18,
                    fatal: true,
                },
            );
            obs.closes.push((prev.id, Close::TakenOver));
            return self.welcome(client, prev.nick, obs);
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
    fn presence(&self, room: &str, kind: u8, who: usize, obs: &mut Obs) {
        let mut group = BTreeMap::new();
        self.presence_into(room, kind, who, &mut group);
        obs.send_group(group);
    }

    fn presence_into(
        &self,
        room: &str,
        kind: u8,
        who: usize,
        group: &mut BTreeMap<u64, Vec<Frame>>,
    ) {
        let members = &self.rooms[room];
        let f = Frame::Presence {
            kind,
            room: room.to_string(),
            nick: self.conns[&who].nick.clone(),
        };
        let self_too = kind == JOIN || kind == LEAVE;
        let to_all = members.len() <= self.cfg.presence_limit;
        for &m in members {
            if (m == who && self_too) || (m != who && to_all) {
                group.entry(self.conns[&m].id).or_default().push(f.clone());
            }
        }
    }

    fn join(&mut self, client: usize, room: String, obs: &mut Obs) {
        if !valid_room(&room) {
            return self.error(obs, client, 10, false);
        }
        if self.rooms.get(&room).is_some_and(|m| m.contains(&client)) {
            return self.error(obs, client, 12, false);
        }
        if self.rooms_of(client).len() >= self.cfg.max_rooms {
            return self.error(obs, client, 20, false);
        }
        self.rooms.entry(room.clone()).or_default().insert(client);
        self.presence(&room, JOIN, client, obs);
    }

    fn leave(&mut self, client: usize, room: &str, obs: &mut Obs) {
        if !valid_room(room) {
            return self.error(obs, client, 10, false);
        }
        if !self.rooms.get(room).is_some_and(|m| m.contains(&client)) {
            return self.error(obs, client, 11, false);
        }
        self.presence(room, LEAVE, client, obs);
        self.remove_member(room, client);
    }

    fn remove_member(&mut self, room: &str, client: usize) {
        let members = self.rooms.get_mut(room).unwrap();
        members.remove(&client);
        if members.is_empty() {
            self.rooms.remove(room);
        }
    }

    fn broadcast(&mut self, room: &str, from: &str, text: &str, obs: &mut Obs) {
        let msg_id = self.next_msg_id;
        self.next_msg_id += 1;
        for m in &self.rooms[room] {
            let f = Frame::Message {
                msg_id,
                room: room.to_string(),
                from: from.to_string(),
                text: text.to_string(),
            };
            obs.send(self.conns[m].id, f);
        }
    }

    fn deliver_whisper(&mut self, to: usize, from: &str, text: &str, obs: &mut Obs) {
        let msg_id = self.next_msg_id;
        self.next_msg_id += 1;
        let f = Frame::Whisper {
            msg_id,
            from: from.to_string(),
            text: text.to_string(),
        };
        obs.send(self.conns[&to].id, f);
    }

    /// Ends `client`'s session: PRESENCE `kind` (if any) to its rooms, then forgets it.
    fn end_session(&mut self, client: usize, kind: Option<u8>, obs: &mut Obs) {
        if let Some(kind) = kind.filter(|_| self.conns[&client].welcomed) {
            let mut group = BTreeMap::new();
            for room in self.rooms_of(client) {
                self.presence_into(&room, kind, client, &mut group);
            }
            obs.send_group(group);
        }
        for room in self.rooms_of(client) {
            self.remove_member(&room, client);
        }
        self.conns.remove(&client);
    }

    /// A fatal ERROR, PRESENCE gone, close.
    fn fatal(&mut self, client: usize, code: u16, why: Close, obs: &mut Obs) {
        let id = self.id(client);
        obs.send(id, Frame::Error { code, fatal: true });
        self.end_session(client, Some(GONE), obs);
        obs.closes.push((id, why));
    }

    fn slow(&mut self, client: usize, obs: &mut Obs) {
        obs.discard(self.id(client));
        self.fatal(client, 15, Close::Slow, obs);
    }

    /// The transport closed `client`'s connection.
    pub fn close(&mut self, client: usize) -> Obs {
        let mut obs = Obs::default();
        if self.is_open(client) {
            self.end_session(client, Some(GONE), &mut obs);
        }
        obs
    }

    /// One tick of time. `core_closes` is the order in which the core closed connections in
    /// this tick; the model checks it is exactly the set of closes due and follows it.
    pub fn tick(&self, core_closes: &[(u64, Close)]) -> Result<(Model, Obs), String> {
        let mut m = self.clone();
        m.now += m.cfg.tick_ms;
        let now = m.now;
        let (hb, idle, hello) = (m.cfg.heartbeat_ms, m.cfg.idle_ms, m.cfg.hello_ms);
        let mut due = Vec::new();
        let mut pings = Vec::new();
        for (&k, c) in &m.conns {
            if !c.welcomed {
                if now >= c.opened + hello {
                    due.push((c.id, Close::Hello));
                }
            } else if now - c.last_rx >= idle {
                due.push((c.id, Close::Idle));
            } else if now - c.last_rx >= hb && !c.pinged {
                pings.push(k);
            }
        }
        let mut got = core_closes.to_vec();
        got.sort();
        due.sort();
        if got != due {
            return Err(format!(
                "at {now} ms the core closed {core_closes:?}; the model expects exactly {due:?}"
            ));
        }
        let mut obs = Obs::default();
        for &(id, why) in core_closes {
            let k = m.client_of(id).unwrap();
            let code = if why == Close::Hello { 17 } else { 16 };
            m.fatal(k, code, why, &mut obs);
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
            self.end_session(k, None, &mut obs);
            obs.closes.push((id, Close::Shutdown));
        }
        obs
    }
}
