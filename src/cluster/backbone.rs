//! The cluster's rules over Redis, sans-IO: link events, bytes and `Instant`s in; bytes to
//! write, deliveries for the core and deadlines out. No socket, no clock.
//!
//! Two links to one Redis: `Cmd` carries commands (each SAY is one `FCALL`, a server-side
//! function that takes the next msg_id with `INCRBY` and `PUBLISH`es, atomically), `Sub`
//! carries the subscriptions to the rooms this node has members in, and what is published
//! there. Redis delivers a subscriber the messages of all its channels in the order it
//! executed the publishes, so every node sees a room's messages in one order, with ids
//! that increase in it.
//!
//! A SAY for a room whose subscription Redis has not confirmed yet is held (its sender
//! would not receive it otherwise) and sent on confirmation; so are SAYs while Redis is
//! unreachable, up to [`HELD_PER_ROOM`]; beyond, they are dropped and counted.
//!
//! Invariants: `Sub`'s pending (un)subscriptions per room are counted in `awaiting`; a room
//! is `ready` (its SAYs go out) only when it is wanted, Redis confirmed every command about
//! it, and both links are connected. Held SAYs exist only for rooms not ready.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::encode::encode;
use redis_protocol::resp2::types::{OwnedFrame, Resp2Frame};

use crate::core::Relay;
use crate::id::ConnId;
use crate::protocol::{PresenceKind, SessionToken};

/// One of the two connections to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Commands: setup, `FCALL chatloop_say`, `PING`.
    Cmd,
    /// Subscriptions, and what arrives on them.
    Sub,
}

impl Link {
    /// Both, in token order.
    pub const ALL: [Link; 2] = [Link::Cmd, Link::Sub];

    fn index(self) -> usize {
        match self {
            Link::Cmd => 0,
            Link::Sub => 1,
        }
    }
}

/// SAYs held per room while its subscription is not confirmed or Redis is unreachable.
pub const HELD_PER_ROOM: usize = 256;

/// Most bytes buffered from one link without a whole RESP frame (a reply larger than this
/// is not one Redis sends us): the link is reset.
const MAX_INPUT: usize = 64 << 20;

/// Interval of the lease renewal (one `SET ... PX` per node, whatever its sessions), which
/// also measures the round trip and notices a stalled Redis.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a node's lease lasts unrenewed: a node that stops (killed, frozen, cut off) has
/// its nicks free for others this long after its last renewal.
pub const LEASE: Duration = Duration::from_secs(5);

/// A reply older than this means Redis is stalled (stopped, or its host gone): the links are
/// reset and reconnected, as after a failure.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// First reconnect delay; it doubles per failure up to `BACKOFF_MAX`, with ±25 % jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The channel prefix of rooms, and the msg_id counter's key.
const ROOM_CHANNEL: &str = "chatloop:room:";
const MSG_ID_KEY: &str = "chatloop:msg_id";
/// Per room: how many messages it has had (`chatloop_say` counts them), so a node that was
/// cut off tells exactly how many it missed. Its expiry, `SEQ_TTL_MS`, is set again at every
/// 128th message only (an expiry per message was 0.7 us more of Redis's time per SAY, a
/// quarter of it): a quiet room's count may start again, which is not a gap, only a moment
/// when a cut-off node could not count.
const SEQ_KEY: &str = "chatloop:seq:";
const SEQ_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most bytes of messages the catch-ups (`chatloop_catchup`) of one reconnection bring back
/// from the rooms' history, shared evenly by the rooms: the answers are pushed on this node's
/// subscription, which Redis cuts past its pub/sub output limit (32 MB by default, and 8 MB
/// for a minute), and one answer is read whole.
const CATCHUP_BYTES: usize = 4 << 20;
/// A room's kept messages (`--history`): a stream whose entry ids are the msg_ids.
const HISTORY_KEY: &str = "chatloop:history:";
/// Per room: the newest msg_id of its history lost with a whole stream (the stream evicted by
/// the byte cap, or expired), and the newest msg_id ever written to it.
const HISTORY_LOST_KEY: &str = "chatloop:history_lost:";
const HISTORY_LAST_KEY: &str = "chatloop:history_last:";
/// What every room's history costs in Redis (payloads plus 128 bytes each), the rooms by last
/// write, and each room's cost: the byte cap (`--history-bytes`) evicts the least recently
/// written room's whole stream first.
const HISTORY_BYTES_KEY: &str = "chatloop:history_bytes";
const HISTORY_ROOMS_KEY: &str = "chatloop:history_rooms";
const HISTORY_SIZES_KEY: &str = "chatloop:history_sizes";
/// The cluster's history epoch (HISTORY_END's `epoch`): set once, by the first node.
const EPOCH_KEY: &str = "chatloop:epoch";
/// Most messages one HISTORY reads from Redis (`XREVRANGE ... COUNT`): Redis is every node's,
/// and one call must stay short whatever `--history` and the asked limit are. A longer answer
/// says `more`, and the client asks again.
const HISTORY_PAGE: u32 = 4096;
/// How long a room's history outlives its last message without `--history-age`.
const HISTORY_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Nick keys (the value is the holder's `ident`) and node leases (`chatloop:node:<ident>`).
const NICK_KEY: &str = "chatloop:nick:";
const NODE_KEY: &str = "chatloop:node:";
/// Memberships: `chatloop:members:<room>` (nick → ident), `chatloop:noderooms:<ident>`
/// (rooms), `chatloop:nodes` (idents).
const MEMBERS_KEY: &str = "chatloop:members:";
const NODEROOMS_KEY: &str = "chatloop:noderooms:";
const NODES_KEY: &str = "chatloop:nodes";

/// How often a node looks for processes whose lease ended (and reaps their members).
const REAP_EVERY: Duration = Duration::from_secs(2);

/// Each process's whisper channel: `chatloop:whisper:<ident>`.
const WHISPER_CHANNEL: &str = "chatloop:whisper:";

/// The server-side functions (Redis 7 functions). `chatloop_say`: the msg_id and the publish
/// in one atomic step, so ids increase in publish order; its payload is
/// `<id>:<from length byte><from><text>`. `chatloop_floor`: raises the counter to at least a
/// node's highest id, sent first on every connection, so a Redis that lost its data (a
/// restart without persistence) does not hand out ids this node's members have seen.
/// `chatloop_claim`: a nick key is set to the claiming node's ident unless another node whose
/// lease is alive holds it (a dead node's nicks are free without anyone deleting them).
/// `chatloop_release`: deletes a nick key (and the session key of a token) if this node holds
/// it. `chatloop_session`: `chatloop:session:<sha1 of the token>` names the process holding
/// a session (the token itself is not stored). `chatloop_takeover`: asks the process holding
/// a token's session (with a live lease) for it, on its channel. `chatloop_handover`: moves a
/// session's nick, token and memberships to the resuming process and tells it. `chatloop_whisper`: finds
/// the process holding a nick (with a live lease), numbers the whisper and publishes it on
/// that process's channel; 0 if nobody holds the nick. Cluster ids are even (`INCRBY 2`):
/// a node's own ids are odd (`Chat::local_msg_id`), so the two never meet.
/// `chatloop_presence`: a membership change (`chatloop:members:<room>`, a hash of nick to
/// ident; the rooms of each process in `chatloop:noderooms:<ident>`; every process in
/// `chatloop:nodes`) and its PRESENCE, `P<kind><members>:<nick>`, with the room's member
/// count across the cluster (kind 0: register without a PRESENCE; kind A: register, and if
/// the member was not registered and this process had been reaped, `chatloop:reaped:<ident>`,
/// announce it with a PRESENCE join: the others were told it was gone). `chatloop_who`: a room's
/// members whose process's lease is alive. `chatloop_reap`: for every process whose lease
/// ended, its members leave their rooms with PRESENCE gone (and this process's own entries go
/// silently, before it registers its members again).
const LIBRARY: &str = "#!lua name=chatloop\n\
redis.register_function('chatloop_say', function(keys, args)\n\
  local id = redis.call('INCRBY', keys[1], 2)\n\
  local seq = redis.call('INCR', keys[3])\n\
  if seq % 128 == 1 then redis.call('PEXPIRE', keys[3], args[2]) end\n\
  redis.call('PUBLISH', keys[2], id .. ':' .. seq .. ':' .. args[1])\n\
  if keys[4] then\n\
    local t = redis.call('TIME')\n\
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n\
    local keep = tonumber(args[4]) * 2\n\
    local len, gone = redis.call('XLEN', keys[4]), 0\n\
    if len == 0 then\n\
      local last = redis.call('GET', keys[9])\n\
      if last then redis.call('SET', keys[8], last, 'PX', keep) end\n\
      local old = redis.call('HGET', keys[7], keys[4])\n\
      if old then\n\
        redis.call('DECRBY', keys[5], old)\n\
        redis.call('HDEL', keys[7], keys[4])\n\
      end\n\
    elseif len >= tonumber(args[3]) then\n\
      local old = redis.call('XRANGE', keys[4], '-', '+', 'COUNT', len - tonumber(args[3]) + 1)\n\
      for _, e in ipairs(old) do gone = gone + #e[2][2] + 128 end\n\
      if #old > 0 then redis.call('SET', keys[8], string.match(old[#old][1], '^(%d+)'), 'PX', keep) end\n\
    end\n\
    local added = redis.pcall('XADD', keys[4], 'MAXLEN', args[3], id .. '-0', 'p', args[1], 't', string.format('%.0f', now))\n\
    if type(added) == 'string' then\n\
      redis.call('SET', keys[9], id, 'PX', keep)\n\
      local delta = #args[1] + 128 - gone\n\
      redis.call('HINCRBY', keys[7], keys[4], delta)\n\
      local total = redis.call('INCRBY', keys[5], delta)\n\
      redis.call('ZADD', keys[6], id, keys[4])\n\
      while total > tonumber(args[5]) do\n\
        local v = redis.call('ZPOPMIN', keys[6])[1]\n\
        if not v or v == keys[4] then\n\
          if v then redis.call('ZADD', keys[6], id, v) end\n\
          break\n\
        end\n\
        local size = redis.call('HGET', keys[7], v) or '0'\n\
        redis.call('HDEL', keys[7], v)\n\
        redis.call('DEL', v)\n\
        total = redis.call('DECRBY', keys[5], size)\n\
      end\n\
    end\n\
    redis.call('PEXPIRE', keys[4], args[4])\n\
  end\n\
  return id\n\
end)\n\
redis.register_function('chatloop_catchup', function(keys, args)\n\
  local seq, out, total = redis.call('GET', keys[1]) or '0', {}, 0\n\
  if keys[2] then\n\
    for _, e in ipairs(redis.call('XRANGE', keys[2], '(' .. args[3] .. '-0', '+', 'COUNT', args[4])) do\n\
      local p = e[2][2]\n\
      if total + #p > tonumber(args[5]) then break end\n\
      total = total + #p\n\
      out[#out + 1] = string.match(e[1], '^(%d+)') .. ' ' .. #p .. ' ' .. p\n\
    end\n\
  end\n\
  redis.call('PUBLISH', args[1], 'G' .. seq .. ':' .. args[2] .. '\\n' .. table.concat(out))\n\
  return #out\n\
end)\n\
redis.register_function('chatloop_epoch', function(keys, args)\n\
  redis.call('SET', keys[1], args[1], 'NX')\n\
  return redis.call('GET', keys[1])\n\
end)\n\
redis.register_function('chatloop_history', function(keys, args)\n\
  local limit, budget, age = tonumber(args[6]), tonumber(args[7]), tonumber(args[8])\n\
  local lost = redis.call('GET', keys[2])\n\
  local floor, cut, n, total, out = tonumber(lost or '0'), 0, 0, 0, {}\n\
  if redis.call('EXISTS', keys[1]) == 0 then\n\
    floor = math.max(floor, tonumber(redis.call('GET', keys[3]) or '0'))\n\
  else\n\
    local info = redis.call('XINFO', 'STREAM', keys[1])\n\
    local len, added, first = 0, 0, nil\n\
    for i = 1, #info, 2 do\n\
      if info[i] == 'length' then len = info[i + 1]\n\
      elseif info[i] == 'entries-added' then added = info[i + 1]\n\
      elseif info[i] == 'first-entry' and info[i + 1] then first = info[i + 1][1] end\n\
    end\n\
    if added > len and first and not lost then floor = math.max(floor, tonumber(string.match(first, '^(%d+)')) - 1) end\n\
    local t = redis.call('TIME')\n\
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n\
    for _, e in ipairs(redis.call('XREVRANGE', keys[1], args[5], args[4], 'COUNT', limit + 1)) do\n\
      local id, p, at = tonumber(string.match(e[1], '^(%d+)')), e[2][2], tonumber(e[2][4])\n\
      if age > 0 and at and at + age <= now then\n\
        if id > floor then floor = id end\n\
        break\n\
      end\n\
      if n >= limit or (total + #p > budget and (n > 0 or budget == 0)) then cut = 1 break end\n\
      n = n + 1\n\
      total = total + #p\n\
      out[n] = string.format('%.0f', id) .. ' ' .. #p .. ' ' .. p\n\
    end\n\
  end\n\
  local parts = {}\n\
  for i = n, 1, -1 do parts[#parts + 1] = out[i] end\n\
  redis.call('PUBLISH', args[1], 'R' .. args[2] .. ':' .. string.format('%.0f', floor) .. ':' .. cut .. ':' .. args[3] .. '\\n' .. table.concat(parts))\n\
  return n\n\
end)\n\
redis.register_function('chatloop_floor', function(keys, args)\n\
  local cur = tonumber(redis.call('GET', keys[1]) or '0')\n\
  local want = tonumber(args[1])\n\
  if cur < want then redis.call('SET', keys[1], want) end\n\
  return cur\n\
end)\n\
redis.register_function('chatloop_claim', function(keys, args)\n\
  local holder = redis.call('GET', keys[1])\n\
  if holder and holder ~= args[1] and redis.call('EXISTS', args[2] .. holder) == 1 then\n\
    return 0\n\
  end\n\
  redis.call('SET', keys[1], args[1])\n\
  return 1\n\
end)\n\
redis.register_function('chatloop_whisper', function(keys, args)\n\
  local holder = redis.call('GET', keys[1])\n\
  if not holder or redis.call('EXISTS', args[1] .. holder) == 0 then\n\
    redis.call('PUBLISH', args[4], 'X' .. args[5] .. ':0')\n\
    return 0\n\
  end\n\
  local id = redis.call('INCRBY', keys[2], 2)\n\
  local got = redis.call('PUBLISH', args[2] .. holder, id .. ':' .. args[3])\n\
  redis.call('PUBLISH', args[4], 'X' .. args[5] .. ':' .. (got > 0 and '1' or '2'))\n\
  return id\n\
end)\n\
redis.register_function('chatloop_presence', function(keys, args)\n\
  local n = redis.call('HLEN', keys[1])\n\
  if args[1] == '1' or args[1] == '0' or args[1] == 'A' then\n\
    local added = redis.call('HSET', keys[1], args[2], args[3])\n\
    redis.call('SADD', args[4], args[5])\n\
    redis.call('SADD', args[6], args[3])\n\
    n = redis.call('HLEN', keys[1])\n\
    if args[1] == 'A' then\n\
      if added == 1 and redis.call('EXISTS', 'chatloop:reaped:' .. args[3]) == 1 then\n\
        redis.call('PUBLISH', keys[2], 'P1' .. n .. ':' .. args[2])\n\
      end\n\
      return n\n\
    end\n\
  else\n\
    redis.call('HDEL', keys[1], args[2])\n\
  end\n\
  if args[1] ~= '0' then\n\
    redis.call('PUBLISH', keys[2], 'P' .. args[1] .. n .. ':' .. args[2])\n\
  end\n\
  return n\n\
end)\n\
redis.register_function('chatloop_who', function(keys, args)\n\
  local all = redis.call('HGETALL', keys[1])\n\
  local out, alive = {}, {}\n\
  for i = 1, #all, 2 do\n\
    local ident = all[i + 1]\n\
    if alive[ident] == nil then alive[ident] = redis.call('EXISTS', args[1] .. ident) == 1 end\n\
    if alive[ident] then out[#out + 1] = all[i] end\n\
  end\n\
  redis.call('PUBLISH', args[2], 'W' .. args[3] .. ':' .. args[4] .. '\\n' .. table.concat(out, '\\n'))\n\
  return #out\n\
end)\n\
redis.register_function('chatloop_reap', function(keys, args)\n\
  local reaped = 0\n\
  for _, ident in ipairs(redis.call('SMEMBERS', keys[1])) do\n\
    local mine = ident == args[5]\n\
    if mine or redis.call('EXISTS', args[1] .. ident) == 0 then\n\
      for _, room in ipairs(redis.call('SMEMBERS', args[2] .. ident)) do\n\
        local mk = args[3] .. room\n\
        local all = redis.call('HGETALL', mk)\n\
        for i = 1, #all, 2 do\n\
          if all[i + 1] == ident then\n\
            local n = redis.call('HLEN', mk)\n\
            redis.call('HDEL', mk, all[i])\n\
            if not mine then\n\
              redis.call('PUBLISH', args[4] .. room, 'P4' .. n .. ':' .. all[i])\n\
              reaped = reaped + 1\n\
            end\n\
          end\n\
        end\n\
      end\n\
      redis.call('DEL', args[2] .. ident)\n\
      if not mine then\n\
        redis.call('SREM', keys[1], ident)\n\
        redis.call('SET', 'chatloop:reaped:' .. ident, '1', 'EX', 600)\n\
      end\n\
    end\n\
  end\n\
  return reaped\n\
end)\n\
redis.register_function('chatloop_release', function(keys, args)\n\
  if redis.call('GET', keys[1]) == args[1] then redis.call('DEL', keys[1]) end\n\
  if args[2] ~= '' then\n\
    local sk = 'chatloop:session:' .. redis.sha1hex(args[2])\n\
    if redis.call('GET', sk) == args[1] then redis.call('DEL', sk) end\n\
  end\n\
  return 0\n\
end)\n\
redis.register_function('chatloop_session', function(keys, args)\n\
  redis.call('SET', 'chatloop:session:' .. redis.sha1hex(args[1]), args[2])\n\
  if args[3] ~= '' then\n\
    local old = 'chatloop:session:' .. redis.sha1hex(args[3])\n\
    if redis.call('GET', old) == args[2] then redis.call('DEL', old) end\n\
  end\n\
  return 0\n\
end)\n\
redis.register_function('chatloop_takeover', function(keys, args)\n\
  local holder = redis.call('GET', 'chatloop:session:' .. redis.sha1hex(args[1]))\n\
  if not holder or holder == args[2] or redis.call('EXISTS', args[3] .. holder) == 0 then\n\
    return 0\n\
  end\n\
  redis.call('PUBLISH', args[4] .. holder, 'T' .. args[5] .. ':' .. args[2] .. '\\n' .. args[1])\n\
  return 1\n\
end)\n\
redis.register_function('chatloop_handover', function(keys, args)\n\
  redis.call('SET', 'chatloop:session:' .. redis.sha1hex(args[1]), args[2])\n\
  redis.call('SET', args[4], args[2])\n\
  local rooms = {}\n\
  for i = 11, #args do\n\
    redis.call('HSET', args[7] .. args[i], args[3], args[2])\n\
    redis.call('SADD', args[8] .. args[2], args[i])\n\
    rooms[#rooms + 1] = args[i]\n\
  end\n\
  redis.call('SADD', args[9], args[2])\n\
  local msg = 'H' .. args[6] .. ':' .. args[3] .. '\\n' .. table.concat(rooms, '\\n') .. '\\n\\0' .. args[10]\n\
  redis.call('PUBLISH', args[5] .. args[2], msg)\n\
  return 0\n\
end)\n";

/// What came over the backbone for this node's core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A room message, for [`Chat::handle_remote_message`].
    ///
    /// [`Chat::handle_remote_message`]: crate::core::Chat::handle_remote_message
    Message {
        /// The room.
        room: String,
        /// The id Redis assigned.
        msg_id: u64,
        /// The sender's nick.
        from: String,
        /// The text.
        text: String,
    },
    /// The answer to a [`Relay::Claim`], for [`Chat::handle_claim`].
    ///
    /// [`Chat::handle_claim`]: crate::core::Chat::handle_claim
    Claim {
        /// The connection whose HELLO asked.
        conn: ConnId,
        /// The nick.
        nick: String,
        /// Free on every node, now this node's.
        granted: bool,
    },
    /// A nick this node held was found held by another node when registered again, for
    /// [`Chat::handle_claim_lost`].
    ///
    /// [`Chat::handle_claim_lost`]: crate::core::Chat::handle_claim_lost
    ClaimLost {
        /// The nick.
        nick: String,
    },
    /// The answer to a [`Relay::Whisper`], for [`Chat::handle_whisper_result`].
    ///
    /// [`Chat::handle_whisper_result`]: crate::core::Chat::handle_whisper_result
    WhisperResult {
        /// The sender's connection.
        conn: ConnId,
        /// Some node holds the nick (or the outcome is unknown: a link failed meanwhile).
        delivered: bool,
    },
    /// A WHISPER for a session here, for [`Chat::handle_remote_whisper`].
    ///
    /// [`Chat::handle_remote_whisper`]: crate::core::Chat::handle_remote_whisper
    Whisper {
        /// The id the cluster gave it.
        msg_id: u64,
        /// The sender's nick.
        from: String,
        /// The target's nick.
        to: String,
        /// The text.
        text: String,
    },
    /// No session anywhere for a [`Relay::Resume`], for [`Chat::handle_resume_result`].
    ///
    /// [`Chat::handle_resume_result`]: crate::core::Chat::handle_resume_result
    ResumeFailed {
        /// The connection whose HELLO asked.
        conn: ConnId,
    },
    /// A session moved here for a [`Relay::Resume`], for [`Chat::handle_resume_handover`].
    ///
    /// [`Chat::handle_resume_handover`]: crate::core::Chat::handle_resume_handover
    Handover {
        /// The connection whose HELLO asked.
        conn: ConnId,
        /// The session's nick.
        nick: String,
        /// Its rooms.
        rooms: Vec<String>,
        /// The whispers held for it where it was (msg_id, from, text), for
        /// [`Chat::handle_handover_whispers`].
        ///
        /// [`Chat::handle_handover_whispers`]: crate::core::Chat::handle_handover_whispers
        whispers: Vec<(u64, String, String)>,
    },
    /// Another process asks for the session with this token (its client resumed there),
    /// for [`Chat::handle_takeover_request`]; then [`Backbone::handover`].
    ///
    /// [`Chat::handle_takeover_request`]: crate::core::Chat::handle_takeover_request
    TakeoverRequest {
        /// The token the client sent there.
        token: SessionToken,
        /// The asking process.
        to: String,
        /// Its connection (as it numbers them).
        conn: u64,
    },
    /// A QUIT's barrier came back, for [`Chat::handle_barrier`].
    ///
    /// [`Chat::handle_barrier`]: crate::core::Chat::handle_barrier
    Barrier {
        /// The connection that quits.
        conn: ConnId,
    },
    /// This process's number for this connection to Redis, for
    /// [`Chat::handle_process_number`].
    ///
    /// [`Chat::handle_process_number`]: crate::core::Chat::handle_process_number
    ProcessNumber(u64),
    /// A PRESENCE, for [`Chat::handle_remote_presence`].
    ///
    /// [`Chat::handle_remote_presence`]: crate::core::Chat::handle_remote_presence
    Presence {
        /// The room.
        room: String,
        /// What happened.
        kind: PresenceKind,
        /// Whom it concerns.
        nick: String,
        /// The room's members across the cluster (with the member concerned).
        members: u64,
    },
    /// The answer to a [`Relay::History`], for [`Chat::handle_history_result`].
    ///
    /// [`Chat::handle_history_result`]: crate::core::Chat::handle_history_result
    History {
        /// The asker.
        conn: ConnId,
        /// The room.
        room: String,
        /// The kept messages asked for, oldest first: (msg_id, from, text).
        entries: Vec<(u64, String, String)>,
        /// The newest msg_id of the room's history no longer kept (0: none).
        floor: u64,
        /// Older messages of the range were left out (limit or budget).
        cut: bool,
        /// No answer could be had (Redis went away, or refused).
        lost: bool,
    },
    /// The cluster's history epoch, for [`Chat::set_history_epoch`].
    ///
    /// [`Chat::set_history_epoch`]: crate::core::Chat::set_history_epoch
    Epoch(u64),
    /// The answer to a [`Relay::Who`], for [`Chat::handle_who_result`].
    ///
    /// [`Chat::handle_who_result`]: crate::core::Chat::handle_who_result
    Who {
        /// The asker.
        conn: ConnId,
        /// The room.
        room: String,
        /// Its members on every node.
        nicks: Vec<String>,
    },
}

/// What waits for a room to be ready: what the core handed out, in its order.
#[derive(Debug)]
enum Outgoing {
    Say {
        from: Box<str>,
        text: Box<str>,
    },
    Presence {
        kind: PresenceKind,
        nick: Box<str>,
    },
    /// A WHO of a room this node is joining: after the joins before it.
    Who {
        conn: ConnId,
    },
    /// A HISTORY of such a room (`HistoryAsk`).
    History(HistoryAsk),
}

/// A HISTORY for the cluster's history of a room (see [`Relay::History`]).
#[derive(Debug, Clone, Copy)]
struct HistoryAsk {
    conn: ConnId,
    since: u64,
    until: u64,
    limit: u32,
    budget: u32,
}

/// An answer that comes back on this process's channel (`Backbone::answers_out`).
#[derive(Debug)]
enum Answer {
    /// A WHO's list, for that room.
    Who(Box<str>),
    /// A whisper's result.
    Whisper,
    /// A HISTORY's messages, for that room.
    History(Box<str>),
}

/// The backbone's counters, for /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackboneStats {
    /// Both links connected.
    pub up: bool,
    /// Nick claims answered: granted.
    pub claims_granted: u64,
    /// Nick claims answered: refused (held on another node).
    pub claims_refused: u64,
    /// Lease renewals lost with a failed or stalled link.
    pub lease_failures: u64,
    /// Times this node's lease had ended before a renewal (it was stopped or cut off
    /// longer than the lease): it registered its nicks and members again.
    pub lease_lapses: u64,
    /// Members of dead processes this node removed from their rooms (PRESENCE gone sent).
    pub members_reaped: u64,
    /// SAYs sent to Redis (`FCALL`).
    pub published: u64,
    /// Room messages received from Redis (every node's, this one's included).
    pub received: u64,
    /// SAYs that did not cross: held past [`HELD_PER_ROOM`], refused by Redis, or sent
    /// without a reply before a link failed (those may have crossed).
    pub dropped: u64,
    /// Connections made to Redis (pairs of links).
    pub connects: u64,
    /// Link failures (refused, reset, stalled past `REPLY_TIMEOUT`, bad replies).
    pub failures: u64,
    /// Times deliveries from Redis waited for the next loop iteration (this one had
    /// addressed its share of frames).
    pub deliveries_deferred: u64,
    /// Room messages published for rooms this node had members in while it could not
    /// receive them (cut off from Redis, or not yet subscribed again): its members missed
    /// them, unless recovered.
    pub missed: u64,
    /// Of `missed`, those delivered late from the room's history (`--history`) once the
    /// node was back, before anything newer.
    pub recovered: u64,
    /// WHISPERs this node sent to a nick whose node (its lease alive) was not subscribed
    /// at that moment (cut off from Redis): not delivered, the sender not told.
    pub whispers_lost: u64,
    /// The last lease renewal's round trip, in microseconds.
    pub rtt_us: u64,
}

/// What a reply on `Cmd` answers, in the order the commands were sent.
#[derive(Debug, Clone)]
enum Pending {
    /// `AUTH`, before anything else on `Cmd`.
    Auth,
    Setup,
    Say,
    Presence,
    /// A claim for a HELLO; put back in `waiting` if its link fails.
    Claim {
        conn: ConnId,
        nick: Box<str>,
    },
    /// A nick this node holds, registered again on a new connection.
    Reclaim {
        nick: Box<str>,
    },
    /// Put back in `waiting` if its link fails.
    Release {
        nick: Box<str>,
        token: Option<SessionToken>,
    },
    /// A resume's lookup, for this connection.
    Takeover(ConnId),
    /// A lease renewal, sent at that instant.
    Lease(Instant),
    /// `INCR chatloop:process`: this process's number for this connection.
    Process,
    /// A whisper from this connection.
    Whisper(ConnId),
    /// A WHO from this connection.
    Who(ConnId),
    /// A HISTORY from this connection.
    History(ConnId),
    /// The cluster's history epoch.
    Epoch,
    /// A membership registered again (its answer does not matter).
    Register,
    /// A look for dead processes.
    Reap,
    /// A room's catch-up after a reconnection (its answer comes on this process's channel).
    CatchUp,
}

#[derive(Debug, Default)]
struct LinkState {
    connected: bool,
    out: Vec<u8>,
    input: Vec<u8>,
}

#[derive(Debug, Default)]
struct RoomSub {
    /// This node has members in the room.
    wanted: bool,
    /// SUBSCRIBE and UNSUBSCRIBE commands about it that Redis has not confirmed.
    awaiting: u32,
    /// SAYs and PRESENCEs waiting for the room to be ready, in order.
    held: Vec<Outgoing>,
    /// The last message received from the room's channel: its number in the room
    /// (`SEQ_KEY`) and msg_id. Kept while the links are down: the next subscription's
    /// catch-up starts from it.
    last: Option<(u64, u64)>,
    /// After a reconnection, until its catch-up is answered: the `last` it starts from.
    catchup: Option<(u64, u64)>,
}

/// A password, kept out of `Debug` output.
struct Secret(Box<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// The sans-IO backbone (see the module documentation).
#[derive(Debug)]
pub struct Backbone {
    node: Box<str>,
    db: u32,
    links: [LinkState; 2],
    pending: VecDeque<(Pending, Instant)>,
    rooms: HashMap<Box<str>, RoomSub>,
    deliveries: VecDeque<Delivery>,
    /// When to connect (None: connected or connecting).
    retry_at: Option<Instant>,
    backoff: Duration,
    rng: u64,
    next_ping: Option<Instant>,
    /// The highest msg_id the core has seen (`set_floor`).
    floor: u64,
    /// This process in Redis: `<node>/<random>`, so a restarted node with the same name is
    /// not mistaken for the old one (whose nicks are free once its lease ends).
    ident: Box<str>,
    /// Nicks this node holds (folded → as written), registered again on every connection.
    registered: HashMap<Box<str>, Box<str>>,
    /// Its sessions' tokens (folded nick → token), registered again on every connection.
    sessions: HashMap<Box<str>, SessionToken>,
    /// Claims and releases waiting for `Cmd`, in order (those in flight when a link failed
    /// come first).
    waiting: VecDeque<Pending>,
    /// QUIT barriers waiting for held room items to be published first.
    barriers: Vec<ConnId>,
    /// QUIT barriers published, not yet back.
    barriers_out: Vec<ConnId>,
    /// WHO lists (with their room) and whisper results (`None`) that come back on this
    /// process's channel, in order with the room traffic before them; not yet back.
    answers_out: Vec<(ConnId, Answer)>,
    /// Messages kept per room in the cluster's history (`--history`; 0: none), and how long
    /// a room's history outlives its last message (`--history-age`, or `HISTORY_TTL_MS`),
    /// and the cluster's cap on all of it (`--history-bytes`).
    history: (usize, u64, usize),
    /// This node's members, room → nicks, registered again on every connection.
    members: HashMap<Box<str>, std::collections::HashSet<Box<str>>>,
    /// `AUTH`'s user (None: Redis's `default`) and password, sent first on both links.
    auth: Option<(Option<Box<str>>, Secret)>,
    /// `Sub`'s `AUTH` has not been answered yet (its reply is the link's first).
    sub_auth: bool,
    /// A refusal of the credentials was logged as a warning since the last connection.
    auth_warned: bool,
    next_reap: Option<Instant>,
    /// After a reconnection: subscription confirmations still to come for the rooms
    /// subscribed again, then the catch-ups not answered yet. While either is non-zero,
    /// what arrives on `Sub` is `stalled`.
    resubscribing: usize,
    catchups: usize,
    /// Whether deliveries from `Sub` wait for the catch-ups (see `finish_catch_up`), since
    /// when (bounded by `REPLY_TIMEOUT`), and `stats.missed` when they began (for the log).
    stalling: bool,
    stall_since: Option<Instant>,
    missed_before: u64,
    /// What arrived on `Sub` while stalling, in order, with each room message's number in
    /// its room (0 for anything else).
    stalled: Vec<(Delivery, u64)>,
    /// Messages the catch-ups brought back, not yet delivered: (msg_id, room, from, text).
    recovered: Vec<(u64, Box<str>, String, String)>,
    /// The core's highest msg_id (`set_floor`, not rounded): a recovered message at or
    /// below it would break a connection's increasing msg_ids (an odd id the node gave a
    /// local whisper while cut off), and is not delivered.
    delivered: u64,
    stats: BackboneStats,
}

impl Backbone {
    /// A backbone for node `node` using Redis database `db`; it asks to connect at once.
    pub fn new(node: &str, db: u32, seed: u64, now: Instant) -> Self {
        Backbone {
            node: node.into(),
            db,
            links: Default::default(),
            pending: VecDeque::new(),
            rooms: HashMap::new(),
            deliveries: VecDeque::new(),
            retry_at: Some(now),
            backoff: BACKOFF_MIN,
            rng: seed | 1,
            next_ping: None,
            floor: 0,
            ident: format!("{node}/{:016x}", seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).into(),
            registered: HashMap::new(),
            sessions: HashMap::new(),
            waiting: VecDeque::new(),
            barriers: Vec::new(),
            barriers_out: Vec::new(),
            answers_out: Vec::new(),
            history: (0, 0, 0),
            members: HashMap::new(),
            auth: None,
            sub_auth: false,
            auth_warned: false,
            next_reap: None,
            resubscribing: 0,
            catchups: 0,
            stalling: false,
            stall_since: None,
            missed_before: 0,
            stalled: Vec::new(),
            recovered: Vec::new(),
            delivered: 0,
            stats: BackboneStats::default(),
        }
    }

    /// Logs in with `AUTH [user] password` first on every connection (`redis://user:pass@`).
    pub fn set_auth(&mut self, user: Option<&str>, password: &str) {
        self.auth = Some((user.map(Into::into), Secret(password.into())));
    }

    /// Keeps each room's last `per_room` messages in the cluster's history (a Redis stream
    /// per room), for HISTORY on any node; `age_ms` (0: none) drops older ones, and a room's
    /// stream expires that long (or a week, without it) after its last message.
    pub fn set_history(&mut self, per_room: usize, age_ms: u64, max_bytes: usize) {
        self.history = (per_room, age_ms, max_bytes);
    }

    /// xorshift64: jitter, and a proposed history epoch.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This process's name in Redis: `<node>/<random>` (its lease key, its nicks' value).
    pub fn ident(&self) -> &str {
        &self.ident
    }

    /// The counters.
    pub fn stats(&self) -> BackboneStats {
        self.stats
    }

    /// Whether both links are connected.
    pub fn is_up(&self) -> bool {
        self.links.iter().all(|l| l.connected)
    }

    /// True when the shell should open both links now (once per attempt).
    #[must_use]
    pub fn poll_connect(&mut self, now: Instant) -> bool {
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            return true;
        }
        false
    }

    /// `link` finished connecting.
    pub fn handle_connected(&mut self, link: Link, now: Instant) {
        self.links[link.index()].connected = true;
        let name = format!("chatloop-{}", self.node);
        // `AUTH` first: Redis answers nothing else before it when it asks for a password.
        let auth: Option<Vec<Vec<u8>>> = self.auth.as_ref().map(|(user, password)| {
            let mut args = vec![b"AUTH".to_vec()];
            args.extend(user.as_ref().map(|u| u.as_bytes().to_vec()));
            args.push(password.0.as_bytes().to_vec());
            args
        });
        let auth: Option<Vec<&[u8]>> = auth.as_ref().map(|a| a.iter().map(Vec::as_slice).collect());
        match link {
            Link::Cmd => {
                if let Some(auth) = &auth {
                    self.command(now, Pending::Auth, auth);
                }
                if self.db != 0 {
                    self.command(
                        now,
                        Pending::Setup,
                        &[b"SELECT", self.db.to_string().as_bytes()],
                    );
                }
                self.command(
                    now,
                    Pending::Setup,
                    &[b"CLIENT", b"SETNAME", name.as_bytes()],
                );
                self.command(
                    now,
                    Pending::Setup,
                    &[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY.as_bytes()],
                );
                let floor = self.floor.to_string();
                self.command(
                    now,
                    Pending::Setup,
                    &[
                        b"FCALL",
                        b"chatloop_floor",
                        b"1",
                        MSG_ID_KEY.as_bytes(),
                        floor.as_bytes(),
                    ],
                );
                // The lease before any claim: a claim is judged by who holds a live lease.
                self.renew_lease(now, Pending::Setup);
                // A number of its own before any WELCOME, for cluster-unique conn_ids.
                self.command(now, Pending::Process, &[b"INCR", b"chatloop:process"]);
                if self.history.0 > 0 {
                    // One epoch for the cluster's history, whichever node a client asks.
                    let mine = (self.next_random() | 1).to_string();
                    self.command(
                        now,
                        Pending::Epoch,
                        &[
                            b"FCALL",
                            b"chatloop_epoch",
                            b"1",
                            EPOCH_KEY.as_bytes(),
                            mine.as_bytes(),
                        ],
                    );
                }
                self.register_all(now, false);
                for w in std::mem::take(&mut self.waiting) {
                    self.nick_op(now, w);
                }
            }
            Link::Sub => {
                if let Some(auth) = &auth {
                    push_command(&mut self.links[1].out, auth);
                    self.sub_auth = true;
                }
                // Before SUBSCRIBE: a subscribed RESP2 connection takes no other command.
                push_command(
                    &mut self.links[1].out,
                    &[b"CLIENT", b"SETNAME", name.as_bytes()],
                );
                let whispers = format!("{WHISPER_CHANNEL}{}", self.ident);
                push_command(&mut self.links[1].out, &[b"SUBSCRIBE", whispers.as_bytes()]);
                let rooms: Vec<Box<str>> = self
                    .rooms
                    .iter()
                    .filter(|(_, r)| r.wanted)
                    .map(|(n, _)| n.clone())
                    .collect();
                // Rooms this node received before the links went down missed what was
                // published meanwhile: each is caught up once every subscription is
                // confirmed, and until then what arrives waits, so that what is recovered
                // goes out first, in msg_id order with the rest.
                for r in self.rooms.values_mut().filter(|r| r.wanted) {
                    r.catchup = r.last.take();
                    self.stalling |= r.catchup.is_some();
                }
                if self.stalling {
                    self.resubscribing = rooms.len();
                    self.missed_before = self.stats.missed;
                    self.stall_since = Some(now);
                }
                for room in rooms {
                    self.subscribe(&room, true);
                }
            }
        }
        if self.is_up() {
            self.next_ping = Some(now + PING_EVERY);
            // Not before the others have had a lease's time to renew: after an outage of
            // Redis every lease may have expired, and their members are not dead.
            self.next_reap = Some(now + LEASE + REAP_EVERY);
        }
        self.release_ready(now);
    }

    /// A link failed (refused, reset, closed, or the shell found its replies bad): the shell
    /// has closed both; they are reopened after a backoff.
    pub fn handle_disconnected(&mut self, now: Instant, why: &str) {
        let was_up = self.stats.up;
        self.stats.failures += 1;
        self.stats.up = false;
        // Catch-ups that can no longer be answered: what waited for them goes out first.
        self.resubscribing = 0;
        self.catchups = 0;
        self.finish_catch_up();
        let in_flight = self
            .pending
            .iter()
            .filter(|(p, _)| matches!(p, Pending::Say))
            .count();
        self.stats.dropped += in_flight as u64;
        // Claims and releases not answered go again, first, after the reconnection.
        let mut again = VecDeque::new();
        for (p, _) in self.pending.drain(..) {
            match p {
                Pending::Claim { .. } | Pending::Release { .. } => again.push_back(p),
                Pending::Lease(_) => self.stats.lease_failures += 1,
                Pending::Takeover(conn) => {
                    self.deliveries.push_back(Delivery::ResumeFailed { conn });
                }
                _ => {}
            }
        }
        again.extend(self.waiting.drain(..));
        self.waiting = again;
        // Answers that can no longer come: an empty WHO rather than a client waiting; a
        // whisper that may have been delivered (the sender is not told otherwise).
        for (conn, answer) in self.answers_out.drain(..) {
            self.deliveries.push_back(match answer {
                Answer::Who(room) => Delivery::Who {
                    conn,
                    room: room.into(),
                    nicks: Vec::new(),
                },
                Answer::History(room) => lost_history(conn, &room),
                Answer::Whisper => {
                    self.stats.dropped += 1;
                    Delivery::WhisperResult {
                        conn,
                        delivered: true,
                    }
                }
            });
        }
        // A QUIT waits for nothing that can still come.
        for conn in self.barriers_out.drain(..).chain(self.barriers.drain(..)) {
            self.deliveries.push_back(Delivery::Barrier { conn });
        }
        for l in &mut self.links {
            *l = LinkState::default();
        }
        self.sub_auth = false;
        for r in self.rooms.values_mut() {
            r.awaiting = 0;
        }
        self.rooms.retain(|_, r| r.wanted);
        self.next_ping = None;
        self.next_reap = None;
        // Jitter, so nodes that lost Redis together do not return in step.
        self.next_random();
        let spread = self.backoff.as_micros() as u64 / 2;
        let delay =
            self.backoff - self.backoff / 4 + Duration::from_micros(self.rng % spread.max(1));
        self.retry_at = Some(now + delay);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if was_up {
            log::warn!(
                "cluster: lost Redis ({why}); {in_flight} SAYs in flight; retrying in {delay:?}"
            );
        } else if why.contains("refused the credentials") && !self.auth_warned {
            // An operator's mistake, not an outage: said once at warning level, then retried
            // quietly like an unreachable Redis.
            self.auth_warned = true;
            log::warn!("cluster: {why}; retrying with backoff");
        } else {
            log::debug!("cluster: Redis unreachable ({why}); retrying in {delay:?}");
        }
    }

    /// Bytes read from `link`. An `Err` means the link is unusable (a reply we cannot parse,
    /// or a setup command refused): the shell closes both links and calls
    /// [`handle_disconnected`](Self::handle_disconnected).
    pub fn handle_data(&mut self, link: Link, bytes: &[u8], now: Instant) -> Result<(), String> {
        let i = link.index();
        self.links[i].input.extend_from_slice(bytes);
        let mut at = 0;
        let result = loop {
            match decode(&self.links[i].input[at..]) {
                Ok(Some((frame, used))) => {
                    at += used;
                    let r = match link {
                        Link::Cmd => self.handle_reply(frame, now),
                        Link::Sub => self.handle_push(frame, now),
                    };
                    if let Err(e) = r {
                        break Err(e);
                    }
                }
                Ok(None) if self.links[i].input.len() - at > MAX_INPUT => {
                    break Err("a reply over 64 MiB".into());
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("bad RESP: {e:?}")),
            }
        };
        self.links[i].input.drain(..at);
        result
    }

    /// The highest msg_id the core has given or delivered
    /// ([`Chat::last_msg_id`](crate::core::Chat::last_msg_id)): on every (re)connection the
    /// cluster's counter is raised to at least this.
    pub fn set_floor(&mut self, msg_id: u64) {
        self.delivered = self.delivered.max(msg_id);
        // Rounded up to even: the next cluster id (counting in twos) stays even.
        self.floor = self.floor.max(msg_id + msg_id % 2);
    }

    /// What the core handed out for the backbone.
    pub fn handle_relay(&mut self, relay: Relay, now: Instant) {
        match relay {
            Relay::Opened { room } => {
                let r = self.rooms.entry(room.clone()).or_default();
                debug_assert!(!r.wanted, "Opened twice: {room}");
                r.wanted = true;
                if self.links[1].connected {
                    self.subscribe(&room, true);
                }
            }
            Relay::Closed { room } => {
                let Some(r) = self.rooms.get_mut(&room) else {
                    return;
                };
                r.wanted = false;
                // Its next members, if any, start from their JOIN: nothing to catch up.
                r.last = None;
                r.catchup = None;
                let held = std::mem::take(&mut r.held);
                // This node needs no copy of them now: they go out if Redis is there.
                if self.is_up() {
                    for o in held {
                        self.publish(now, &room, o);
                    }
                } else {
                    for o in held {
                        self.drop_outgoing(&room, o);
                    }
                }
                if self.links[1].connected {
                    self.subscribe(&room, false);
                } else {
                    self.rooms.remove(&room);
                }
            }
            Relay::Claim { conn, nick } => self.nick_op(now, Pending::Claim { conn, nick }),
            Relay::Release { nick, token } => {
                self.registered.remove(&*fold(&nick));
                self.sessions.remove(&*fold(&nick));
                self.nick_op(now, Pending::Release { nick, token });
            }
            Relay::Token { nick, token, old } => {
                self.sessions.insert(fold(&nick), token);
                if self.links[0].connected {
                    self.session_op(now, &token, old.as_ref());
                }
            }
            Relay::Resume { conn, token } => {
                if !self.links[0].connected {
                    self.deliveries.push_back(Delivery::ResumeFailed { conn });
                    return;
                }
                let ident = self.ident.clone();
                let conn_id = conn.to_u64().to_string();
                self.command(
                    now,
                    Pending::Takeover(conn),
                    &[
                        b"FCALL",
                        b"chatloop_takeover",
                        b"0",
                        &token,
                        ident.as_bytes(),
                        NODE_KEY.as_bytes(),
                        WHISPER_CHANNEL.as_bytes(),
                        conn_id.as_bytes(),
                    ],
                );
            }
            Relay::Whisper {
                conn,
                from,
                to,
                text,
            } => {
                if !self.links[0].connected {
                    self.deliveries.push_back(Delivery::WhisperResult {
                        conn,
                        delivered: false,
                    });
                    return;
                }
                let key = format!("{NICK_KEY}{}", fold(&to));
                let mut payload = Vec::with_capacity(2 + to.len() + from.len() + text.len());
                for part in [&*to, &*from] {
                    payload.push(part.len().min(255) as u8);
                    payload.extend_from_slice(part.as_bytes());
                }
                payload.extend_from_slice(text.as_bytes());
                let own = format!("{WHISPER_CHANNEL}{}", self.ident);
                let conn_id = conn.to_u64().to_string();
                self.answers_out.push((conn, Answer::Whisper));
                self.command(
                    now,
                    Pending::Whisper(conn),
                    &[
                        b"FCALL",
                        b"chatloop_whisper",
                        b"2",
                        key.as_bytes(),
                        MSG_ID_KEY.as_bytes(),
                        NODE_KEY.as_bytes(),
                        WHISPER_CHANNEL.as_bytes(),
                        &payload,
                        own.as_bytes(),
                        conn_id.as_bytes(),
                    ],
                );
            }
            Relay::Barrier { conn } => {
                if !self.is_up() {
                    self.deliveries.push_back(Delivery::Barrier { conn });
                } else if !self.settled() {
                    // After what is held, and after every subscription this node is making:
                    // a command the barrier lets through may go to such a room, and would be
                    // held there, behind what follows it.
                    self.barriers.push(conn);
                } else {
                    self.publish_barrier(now, conn);
                }
            }
            Relay::Say { room, from, text } => {
                self.send_or_hold(now, &room, Outgoing::Say { from, text })
            }
            Relay::Who { conn, room } => {
                if !self.links[0].connected {
                    self.deliveries.push_back(Delivery::Who {
                        conn,
                        room: room.into(),
                        nicks: Vec::new(),
                    });
                    return;
                }
                if self.rooms.get(&*room).is_some_and(|r| !r.held.is_empty()) {
                    // Joins of this node wait for the room's subscription: the WHO waits
                    // behind them, so it lists them.
                    self.send_or_hold(now, &room.clone(), Outgoing::Who { conn });
                } else {
                    self.who_op(now, conn, room);
                }
            }
            Relay::History {
                conn,
                room,
                since,
                until,
                limit,
                budget,
            } => {
                if !self.links[0].connected {
                    self.deliveries.push_back(lost_history(conn, &room));
                    return;
                }
                let ask = HistoryAsk {
                    conn,
                    since,
                    until,
                    limit,
                    budget,
                };
                if self.rooms.get(&*room).is_some_and(|r| !r.held.is_empty()) {
                    // Behind this node's SAYs to the room still waiting for it: they are
                    // history by the time it is read.
                    self.send_or_hold(now, &room.clone(), Outgoing::History(ask));
                } else {
                    self.history_op(now, room, ask);
                }
            }
            Relay::Presence { room, kind, nick } => {
                let set = self.members.entry(room.clone()).or_default();
                if kind == PresenceKind::Join {
                    set.insert(nick.clone());
                } else {
                    set.remove(&nick);
                    if set.is_empty() {
                        self.members.remove(&room);
                    }
                }
                self.send_or_hold(now, &room, Outgoing::Presence { kind, nick })
            }
        }
    }

    /// The next room message for the core.
    #[must_use]
    pub fn poll_delivery(&mut self) -> Option<Delivery> {
        self.deliveries.pop_front()
    }

    /// Deliveries decoded and not yet taken: a shell that hands the core only so much per
    /// iteration stops reading Redis while there are many (Redis then holds the rest, and
    /// cuts a node that stays behind, as it would any slow subscriber).
    pub fn pending_deliveries(&self) -> usize {
        self.deliveries.len()
    }

    /// The shell left deliveries for the next iteration (for the counter).
    pub fn count_deferred(&mut self) {
        self.stats.deliveries_deferred += 1;
    }

    /// Bytes waiting to be written on `link`.
    pub fn transmit(&self, link: Link) -> &[u8] {
        &self.links[link.index()].out
    }

    /// `n` bytes of [`transmit`](Self::transmit) were written.
    pub fn consume(&mut self, link: Link, n: usize) {
        self.links[link.index()].out.drain(..n);
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next run: a reconnect, the next
    /// `PING`, or the deadline of the oldest reply.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stall = self.pending.front().map(|&(_, t)| t + REPLY_TIMEOUT);
        let catch_up = self.stall_since.map(|t| t + REPLY_TIMEOUT);
        [
            self.retry_at,
            self.next_ping,
            self.next_reap,
            stall,
            catch_up,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs what is due: a `PING`. Returns `Err` when a reply is overdue (Redis stalled): the
    /// shell resets the links as after a failure. A spurious call does nothing.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), String> {
        if self.stall_since.is_some_and(|t| now >= t + REPLY_TIMEOUT) {
            // The subscriptions or the catch-ups' answers did not come back (a half-dead
            // subscriber link): what waits for them would wait for ever.
            return Err(format!("no catch-up from Redis in {REPLY_TIMEOUT:?}"));
        }
        if let Some(&(_, sent)) = self.pending.front() {
            if now >= sent + REPLY_TIMEOUT {
                return Err(format!("no reply from Redis in {REPLY_TIMEOUT:?}"));
            }
        }
        if self.next_reap.is_some_and(|t| now >= t) {
            self.next_reap = Some(now + REAP_EVERY);
            self.reap(now, false);
        }
        if self.next_ping.is_some_and(|t| now >= t) {
            self.next_ping = Some(now + PING_EVERY);
            self.renew_lease(now, Pending::Lease(now));
        }
        Ok(())
    }

    // ----- inside -----

    /// No room holds anything, and every room this node wants is subscribed: what is sent
    /// now goes out in order.
    fn settled(&self) -> bool {
        self.rooms
            .values()
            .all(|r| r.held.is_empty() && (!r.wanted || r.awaiting == 0))
    }

    fn is_ready(&self, room: &str) -> bool {
        self.is_up()
            && self
                .rooms
                .get(room)
                .is_some_and(|r| r.wanted && r.awaiting == 0)
    }

    fn command(&mut self, now: Instant, what: Pending, args: &[&[u8]]) {
        push_command(&mut self.links[0].out, args);
        self.pending.push_back((what, now));
    }

    fn subscribe(&mut self, room: &str, on: bool) {
        let channel = format!("{ROOM_CHANNEL}{room}");
        let verb: &[u8] = if on { b"SUBSCRIBE" } else { b"UNSUBSCRIBE" };
        push_command(&mut self.links[1].out, &[verb, channel.as_bytes()]);
        if let Some(r) = self.rooms.get_mut(room) {
            r.awaiting += 1;
        }
    }

    /// `chatloop_who` for `room`, answering `conn`.
    fn who_op(&mut self, now: Instant, conn: ConnId, room: Box<str>) {
        let key = format!("{MEMBERS_KEY}{room}");
        let own = format!("{WHISPER_CHANNEL}{}", self.ident);
        let conn_id = conn.to_u64().to_string();
        self.answers_out.push((conn, Answer::Who(room.clone())));
        self.command(
            now,
            Pending::Who(conn),
            &[
                b"FCALL",
                b"chatloop_who",
                b"1",
                key.as_bytes(),
                NODE_KEY.as_bytes(),
                own.as_bytes(),
                conn_id.as_bytes(),
                room.as_bytes(),
            ],
        );
    }

    /// `chatloop_history` for `room`, answering `ask.conn` on this process's channel.
    fn history_op(&mut self, now: Instant, room: Box<str>, ask: HistoryAsk) {
        let key = format!("{HISTORY_KEY}{room}");
        let lost = format!("{HISTORY_LOST_KEY}{room}");
        let last = format!("{HISTORY_LAST_KEY}{room}");
        let own = format!("{WHISPER_CHANNEL}{}", self.ident);
        let conn_id = ask.conn.to_u64().to_string();
        // Stream ids are `<msg_id>-0`; `(` makes a bound exclusive.
        let lo = if ask.since == 0 {
            "-".to_string()
        } else {
            format!("({}-0", ask.since)
        };
        let hi = if ask.until == u64::MAX {
            "+".to_string()
        } else {
            format!("({}-0", ask.until)
        };
        let limit = ask.limit.min(HISTORY_PAGE).to_string();
        let budget = ask.budget.to_string();
        let age = self.history.1.to_string();
        self.answers_out
            .push((ask.conn, Answer::History(room.clone())));
        self.command(
            now,
            Pending::History(ask.conn),
            &[
                b"FCALL",
                b"chatloop_history",
                b"3",
                key.as_bytes(),
                lost.as_bytes(),
                last.as_bytes(),
                own.as_bytes(),
                conn_id.as_bytes(),
                room.as_bytes(),
                lo.as_bytes(),
                hi.as_bytes(),
                limit.as_bytes(),
                budget.as_bytes(),
                age.as_bytes(),
            ],
        );
    }

    /// `chatloop_presence` for `nick` in `room` (`kind` "0" registers without a PRESENCE).
    fn presence_op(&mut self, now: Instant, what: Pending, room: &str, kind: String, nick: &str) {
        let members = format!("{MEMBERS_KEY}{room}");
        let channel = format!("{ROOM_CHANNEL}{room}");
        let noderooms = format!("{NODEROOMS_KEY}{}", self.ident);
        let ident = self.ident.clone();
        self.command(
            now,
            what,
            &[
                b"FCALL",
                b"chatloop_presence",
                b"2",
                members.as_bytes(),
                channel.as_bytes(),
                kind.as_bytes(),
                nick.as_bytes(),
                ident.as_bytes(),
                noderooms.as_bytes(),
                room.as_bytes(),
                NODES_KEY.as_bytes(),
            ],
        );
    }

    /// Everything this node holds, registered again: after a reconnection (Redis may have
    /// lost it) or a lapsed lease (others may have reaped it). Its own stale entries go
    /// first (`chatloop_reap` with this ident, silently); then its members and its nicks
    /// (a nick found taken meanwhile ends its session here: `ClaimLost`).
    fn register_all(&mut self, now: Instant, lapsed: bool) {
        // After a reconnection this node's entries may be stale (Redis kept them while it
        // was away): they go first, silently. Members the others were told were gone (this
        // process was reaped after its lease lapsed) are announced again with a join.
        if !lapsed {
            self.reap(now, true);
        }
        let members: Vec<(Box<str>, Box<str>)> = self
            .members
            .iter()
            .flat_map(|(room, nicks)| nicks.iter().map(move |n| (room.clone(), n.clone())))
            .collect();
        for (room, nick) in members {
            self.presence_op(now, Pending::Register, &room, "A".into(), &nick);
        }
        // Announced once: the mark of the reaping goes with this registration.
        let reaped = format!("chatloop:reaped:{}", self.ident);
        self.command(now, Pending::Register, &[b"DEL", reaped.as_bytes()]);
        let mine: Vec<Box<str>> = self.registered.values().cloned().collect();
        for nick in mine {
            self.nick_op(now, Pending::Reclaim { nick });
        }
        let tokens: Vec<SessionToken> = self.sessions.values().copied().collect();
        for token in tokens {
            self.session_op(now, &token, None);
        }
    }

    /// `chatloop_reap`: members of dead processes leave with PRESENCE gone; with `own`, this
    /// process's entries go too (silently: it registers them again next).
    fn reap(&mut self, now: Instant, own: bool) {
        let me = if own { self.ident.clone() } else { "".into() };
        let what = if own {
            Pending::Register
        } else {
            Pending::Reap
        };
        self.command(
            now,
            what,
            &[
                b"FCALL",
                b"chatloop_reap",
                b"1",
                NODES_KEY.as_bytes(),
                NODE_KEY.as_bytes(),
                NODEROOMS_KEY.as_bytes(),
                MEMBERS_KEY.as_bytes(),
                ROOM_CHANNEL.as_bytes(),
                me.as_bytes(),
            ],
        );
    }

    /// An answer for `conn` came back (or will not): true if it was awaited.
    fn answer_back(&mut self, conn: ConnId) -> bool {
        match self.answers_out.iter().position(|(c, _)| *c == conn) {
            Some(i) => {
                self.answers_out.remove(i);
                true
            }
            None => false,
        }
    }

    /// A QUIT's barrier, on this process's own channel: it comes back on `Sub` after every
    /// push of what Redis ran before it.
    fn publish_barrier(&mut self, now: Instant, conn: ConnId) {
        let channel = format!("{WHISPER_CHANNEL}{}", self.ident);
        let msg = format!("B{}", conn.to_u64());
        self.barriers_out.push(conn);
        self.command(
            now,
            Pending::Register,
            &[b"PUBLISH", channel.as_bytes(), msg.as_bytes()],
        );
    }

    /// `SET chatloop:node:<ident> <node> PX <lease>`: this node is alive.
    fn renew_lease(&mut self, now: Instant, what: Pending) {
        let key = format!("{NODE_KEY}{}", self.ident);
        let px = LEASE.as_millis().to_string();
        let node = self.node.clone();
        self.command(
            now,
            what,
            &[
                b"SET",
                key.as_bytes(),
                node.as_bytes(),
                b"PX",
                px.as_bytes(),
                b"GET",
            ],
        );
    }

    /// A claim, reclaim or release on `Cmd`, or in `waiting` while `Cmd` is down.
    fn nick_op(&mut self, now: Instant, what: Pending) {
        if !self.links[0].connected {
            if !matches!(what, Pending::Reclaim { .. }) {
                self.waiting.push_back(what);
            }
            return;
        }
        let (function, nick): (&[u8], &str) = match &what {
            Pending::Release { nick, .. } => (b"chatloop_release", nick),
            Pending::Claim { nick, .. } | Pending::Reclaim { nick } => (b"chatloop_claim", nick),
            _ => return,
        };
        let key = format!("{NICK_KEY}{}", fold(nick));
        let ident = self.ident.clone();
        let mut cmd: Vec<&[u8]> = vec![b"FCALL", function, b"1", key.as_bytes(), ident.as_bytes()];
        match &what {
            Pending::Release { token, .. } => cmd.push(token.as_ref().map_or(&[][..], |t| &t[..])),
            _ => cmd.push(NODE_KEY.as_bytes()),
        }
        push_command(&mut self.links[0].out, &cmd);
        self.pending.push_back((what, now));
    }

    /// `chatloop_session`: this process holds the session with `token` (in place of `old`).
    fn session_op(&mut self, now: Instant, token: &SessionToken, old: Option<&SessionToken>) {
        let ident = self.ident.clone();
        self.command(
            now,
            Pending::Register,
            &[
                b"FCALL",
                b"chatloop_session",
                b"0",
                token,
                ident.as_bytes(),
                old.map_or(&[][..], |t| &t[..]),
            ],
        );
    }

    /// The answer to a [`Delivery::TakeoverRequest`]: the session (closed here by the core)
    /// moves to process `to`, with its nick and its rooms; `None`, no session here had
    /// that token, and `to` goes on with a new session.
    pub fn handover(
        &mut self,
        now: Instant,
        to: &str,
        conn: u64,
        token: &SessionToken,
        session: Option<(Box<str>, Vec<Box<str>>)>,
        whispers: &[(u64, String, String)],
    ) {
        let channel = format!("{WHISPER_CHANNEL}{to}");
        let Some((nick, rooms)) = session else {
            let msg = format!("N{conn}");
            self.command(
                now,
                Pending::Register,
                &[b"PUBLISH", channel.as_bytes(), msg.as_bytes()],
            );
            return;
        };
        let folded = fold(&nick);
        self.registered.remove(&folded);
        self.sessions.remove(&folded);
        for room in &rooms {
            if let Some(set) = self.members.get_mut(room) {
                set.remove(&nick);
                if set.is_empty() {
                    self.members.remove(room);
                }
            }
        }
        let nick_key = format!("{NICK_KEY}{folded}");
        let conn_id = conn.to_string();
        let noderooms = NODEROOMS_KEY.to_string();
        // `<msg_id> <length> <from length byte><from><text>` each, as a HISTORY answer's.
        let mut held = Vec::new();
        for (msg_id, from, text) in whispers {
            let mut payload = Vec::with_capacity(1 + from.len() + text.len());
            payload.push(from.len().min(255) as u8);
            payload.extend_from_slice(from.as_bytes());
            payload.extend_from_slice(text.as_bytes());
            held.extend_from_slice(format!("{msg_id} {} ", payload.len()).as_bytes());
            held.extend_from_slice(&payload);
        }
        let mut cmd: Vec<&[u8]> = vec![
            b"FCALL",
            b"chatloop_handover",
            b"0",
            token,
            to.as_bytes(),
            nick.as_bytes(),
            nick_key.as_bytes(),
            WHISPER_CHANNEL.as_bytes(),
            conn_id.as_bytes(),
            MEMBERS_KEY.as_bytes(),
            noderooms.as_bytes(),
            NODES_KEY.as_bytes(),
            &held,
        ];
        cmd.extend(rooms.iter().map(|r| r.as_bytes()));
        push_command(&mut self.links[0].out, &cmd);
        self.pending.push_back((Pending::Register, now));
    }

    /// A session moved here ([`Delivery::Handover`]) that the core could not take (its
    /// connection closed meanwhile): its nick and token are this process's in Redis, and
    /// are let go.
    pub fn release_handover(&mut self, now: Instant, nick: &str) {
        self.nick_op(
            now,
            Pending::Release {
                nick: nick.into(),
                token: None,
            },
        );
    }

    /// A session moved here and taken by the core: this process holds its nick and its
    /// memberships now.
    pub fn adopt(&mut self, nick: &str, rooms: &[String]) {
        self.registered.insert(fold(nick), nick.into());
        for room in rooms {
            self.members
                .entry(room.as_str().into())
                .or_default()
                .insert(nick.into());
        }
    }

    fn send_or_hold(&mut self, now: Instant, room: &str, o: Outgoing) {
        if self.is_ready(room) {
            self.publish(now, room, o);
        } else if let Some(r) = self.rooms.get_mut(room) {
            if r.held.len() < HELD_PER_ROOM {
                r.held.push(o);
            } else {
                self.drop_outgoing(room, o);
            }
        } else {
            debug_assert!(false, "an item for a room never opened: {room}");
            self.drop_outgoing(room, o);
        }
    }

    /// What cannot go out: counted, and a WHO waiting for it is answered (empty) rather
    /// than left waiting.
    fn drop_outgoing(&mut self, room: &str, o: Outgoing) {
        self.stats.dropped += 1;
        match o {
            Outgoing::Who { conn } => self.deliveries.push_back(Delivery::Who {
                conn,
                room: room.to_string(),
                nicks: Vec::new(),
            }),
            Outgoing::History(ask) => self.deliveries.push_back(lost_history(ask.conn, room)),
            _ => {}
        }
    }

    fn publish(&mut self, now: Instant, room: &str, o: Outgoing) {
        match o {
            Outgoing::Say { from, text } => self.publish_say(now, room, &from, &text),
            Outgoing::Presence { kind, nick } => {
                self.presence_op(
                    now,
                    Pending::Presence,
                    room,
                    (kind as u8).to_string(),
                    &nick,
                );
            }
            Outgoing::Who { conn } => self.who_op(now, conn, room.into()),
            Outgoing::History(ask) => self.history_op(now, room.into(), ask),
        }
    }

    fn publish_say(&mut self, now: Instant, room: &str, from: &str, text: &str) {
        let channel = format!("{ROOM_CHANNEL}{room}");
        let seq = format!("{SEQ_KEY}{room}");
        let seq_ttl = SEQ_TTL_MS.to_string();
        let mut payload = Vec::with_capacity(1 + from.len() + text.len());
        // Nicks are at most 32 bytes (PROTOCOL.md 1.4), so one byte holds the length.
        payload.push(from.len().min(255) as u8);
        payload.extend_from_slice(from.as_bytes());
        payload.extend_from_slice(text.as_bytes());
        let (per_room, age_ms, max_bytes) = self.history;
        if per_room > 0 {
            // Kept in the room's stream too, in the same call: same id, same order.
            let stream = format!("{HISTORY_KEY}{room}");
            let lost = format!("{HISTORY_LOST_KEY}{room}");
            let last = format!("{HISTORY_LAST_KEY}{room}");
            let n = per_room.to_string();
            let ttl = if age_ms > 0 { age_ms } else { HISTORY_TTL_MS }.to_string();
            let cap = max_bytes.to_string();
            self.command(
                now,
                Pending::Say,
                &[
                    b"FCALL",
                    b"chatloop_say",
                    b"9",
                    MSG_ID_KEY.as_bytes(),
                    channel.as_bytes(),
                    seq.as_bytes(),
                    stream.as_bytes(),
                    HISTORY_BYTES_KEY.as_bytes(),
                    HISTORY_ROOMS_KEY.as_bytes(),
                    HISTORY_SIZES_KEY.as_bytes(),
                    lost.as_bytes(),
                    last.as_bytes(),
                    &payload,
                    seq_ttl.as_bytes(),
                    n.as_bytes(),
                    ttl.as_bytes(),
                    cap.as_bytes(),
                ],
            );
        } else {
            self.command(
                now,
                Pending::Say,
                &[
                    b"FCALL",
                    b"chatloop_say",
                    b"3",
                    MSG_ID_KEY.as_bytes(),
                    channel.as_bytes(),
                    seq.as_bytes(),
                    &payload,
                    seq_ttl.as_bytes(),
                ],
            );
        }
        self.stats.published += 1;
    }

    /// Sends the held SAYs of every room that became ready.
    fn release_ready(&mut self, now: Instant) {
        if !self.is_up() {
            return;
        }
        let ready: Vec<Box<str>> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.wanted && r.awaiting == 0 && !r.held.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for room in ready {
            let held = self
                .rooms
                .get_mut(&room)
                .map(|r| std::mem::take(&mut r.held))
                .unwrap_or_default();
            for o in held {
                self.publish(now, &room, o);
            }
        }
        if self.settled() {
            for conn in std::mem::take(&mut self.barriers) {
                self.publish_barrier(now, conn);
            }
        }
    }

    fn handle_reply(&mut self, frame: OwnedFrame, now: Instant) -> Result<(), String> {
        let Some((what, _)) = self.pending.pop_front() else {
            return Err(format!("a reply nobody asked for: {frame:?}"));
        };
        match (what, &frame) {
            (Pending::Auth, OwnedFrame::Error(e)) => {
                return Err(format!("Redis refused the credentials: {e}"));
            }
            (Pending::Setup, OwnedFrame::Error(e)) => {
                return Err(format!("setup refused: {e} (Redis 7 or later is needed)"));
            }
            // Connected is when Redis answers, not when the kernel accepts the connection
            // (a stopped Redis's does): then the backoff starts over.
            (Pending::Setup, _) if !self.stats.up => {
                self.stats.up = true;
                self.stats.connects += 1;
                self.auth_warned = false;
                self.backoff = BACKOFF_MIN;
                log::info!("cluster: connected to Redis as node {}", self.node);
            }
            (Pending::Say | Pending::Presence, OwnedFrame::Error(e)) => {
                self.stats.dropped += 1;
                log::warn!("cluster: a SAY was refused by Redis: {e}");
            }
            (Pending::Lease(sent), reply) => {
                self.stats.rtt_us = now.saturating_duration_since(sent).as_micros() as u64;
                if matches!(reply, OwnedFrame::Null) {
                    // The lease had ended: others may have reaped this node's members and
                    // taken its nicks. What it holds is registered again.
                    self.stats.lease_lapses += 1;
                    log::warn!("cluster: this node's lease had ended; registering again");
                    self.register_all(now, true);
                }
            }
            (Pending::Process, OwnedFrame::Integer(n)) => {
                self.deliveries
                    .push_back(Delivery::ProcessNumber(u64::try_from(*n).unwrap_or(0)));
            }
            (Pending::Reap, OwnedFrame::Integer(n)) if *n > 0 => {
                self.stats.members_reaped += *n as u64;
                log::info!("cluster: {n} members of a node that stopped left their rooms");
            }
            (Pending::Claim { conn, nick }, reply) => {
                let granted = matches!(reply, OwnedFrame::Integer(1));
                if let OwnedFrame::Error(e) = reply {
                    log::warn!("cluster: a nick claim was refused by Redis: {e}");
                }
                if granted {
                    self.stats.claims_granted += 1;
                    self.registered.insert(fold(&nick), nick.clone());
                } else {
                    self.stats.claims_refused += 1;
                }
                self.deliveries.push_back(Delivery::Claim {
                    conn,
                    nick: nick.into(),
                    granted,
                });
            }
            // 1: the holder was asked, and its answer comes on this process's channel.
            (Pending::Takeover(conn), reply) if !matches!(reply, OwnedFrame::Integer(1)) => {
                self.deliveries.push_back(Delivery::ResumeFailed { conn });
            }
            (Pending::Who(conn), OwnedFrame::Error(e)) => {
                log::warn!("cluster: a WHO was refused by Redis: {e}");
                if let Some(i) = self.answers_out.iter().position(|(c, _)| *c == conn) {
                    if let (_, Answer::Who(room)) = self.answers_out.remove(i) {
                        self.deliveries.push_back(Delivery::Who {
                            conn,
                            room: room.into(),
                            nicks: Vec::new(),
                        });
                    }
                }
            }
            (Pending::History(conn), OwnedFrame::Error(e)) => {
                log::warn!("cluster: a HISTORY was refused by Redis: {e}");
                if let Some(i) = self.answers_out.iter().position(|(c, _)| *c == conn) {
                    if let (_, Answer::History(room)) = self.answers_out.remove(i) {
                        self.deliveries.push_back(lost_history(conn, &room));
                    }
                }
            }
            (Pending::Epoch, OwnedFrame::BulkString(b)) => {
                let epoch = std::str::from_utf8(b).ok().and_then(|s| s.parse().ok());
                if let Some(epoch) = epoch {
                    self.deliveries.push_back(Delivery::Epoch(epoch));
                }
            }
            // The answer comes on this process's channel; an error means it will not.
            (Pending::Whisper(conn), OwnedFrame::Error(e)) => {
                log::warn!("cluster: a whisper was refused by Redis: {e}");
                self.answer_back(conn);
                self.deliveries.push_back(Delivery::WhisperResult {
                    conn,
                    delivered: false,
                });
            }
            // The answer comes on this process's channel; an error means it will not.
            (Pending::CatchUp, OwnedFrame::Error(e)) => {
                log::warn!("cluster: a catch-up was refused by Redis: {e}");
                self.catch_up_answered();
            }
            (Pending::Reclaim { nick }, reply) => {
                if matches!(reply, OwnedFrame::Integer(0)) {
                    self.registered.remove(&*fold(&nick));
                    self.deliveries
                        .push_back(Delivery::ClaimLost { nick: nick.into() });
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn handle_push(&mut self, frame: OwnedFrame, now: Instant) -> Result<(), String> {
        let OwnedFrame::Array(parts) = frame else {
            // The replies to AUTH and CLIENT SETNAME, before the first SUBSCRIBE.
            let auth = std::mem::take(&mut self.sub_auth);
            return match frame {
                OwnedFrame::Error(e) if auth => Err(format!("Redis refused the credentials: {e}")),
                OwnedFrame::Error(e) => Err(format!("subscriber setup refused: {e}")),
                _ => Ok(()),
            };
        };
        let kind = parts.first().and_then(|p| p.as_bytes()).unwrap_or_default();
        let channel = parts.get(1).and_then(|p| p.as_bytes()).unwrap_or_default();
        let room = channel
            .strip_prefix(ROOM_CHANNEL.as_bytes())
            .and_then(|r| std::str::from_utf8(r).ok());
        if kind == b"message" && channel.starts_with(WHISPER_CHANNEL.as_bytes()) {
            let payload = parts.get(2).and_then(|p| p.as_bytes()).unwrap_or_default();
            if payload.first() == Some(&b'G') {
                match parse_catch_up(payload) {
                    Some((room, seq, entries)) => self.handle_catch_up(&room, seq, entries),
                    None => {
                        log::warn!("cluster: a malformed catch-up ignored");
                        self.catch_up_answered();
                    }
                }
                return Ok(());
            }
            let parsed = match payload.first() {
                Some(b'T' | b'H' | b'N' | b'B' | b'W' | b'X') => parse_session_message(payload),
                Some(b'R') => parse_history(payload),
                _ => parse_whisper(payload),
            };
            match parsed {
                Some(
                    d @ (Delivery::Who { .. }
                    | Delivery::WhisperResult { .. }
                    | Delivery::History { .. }),
                ) => {
                    let conn = match &d {
                        Delivery::Who { conn, .. }
                        | Delivery::WhisperResult { conn, .. }
                        | Delivery::History { conn, .. } => *conn,
                        _ => return Ok(()),
                    };
                    if payload.first() == Some(&b'X') && payload.ends_with(b":2") {
                        // Its node holds the nick but was not there to receive it.
                        self.stats.whispers_lost += 1;
                        log::debug!("cluster: a whisper found its node cut off from Redis");
                    }
                    if self.answer_back(conn) {
                        self.push_sub(d, 0);
                    }
                }
                Some(Delivery::Barrier { conn }) => {
                    if let Some(i) = self.barriers_out.iter().position(|&c| c == conn) {
                        self.barriers_out.swap_remove(i);
                        self.push_sub(Delivery::Barrier { conn }, 0);
                    }
                }
                Some(d) => self.push_sub(d, 0),
                None => log::warn!("cluster: a malformed whisper ignored"),
            }
            return Ok(());
        }
        match kind {
            b"message" => {
                let Some(room) = room else {
                    return Ok(());
                };
                let payload = parts.get(2).and_then(|p| p.as_bytes()).unwrap_or_default();
                match parse_payload(room, payload) {
                    Some((d, seq)) => {
                        if let Delivery::Message { msg_id, .. } = d {
                            self.stats.received += 1;
                            self.count_gap(room, seq, msg_id);
                        }
                        self.push_sub(d, seq);
                    }
                    None => log::warn!(
                        "cluster: a malformed message on {} ignored",
                        crate::untrusted::Untrusted(room)
                    ),
                }
            }
            b"subscribe" | b"unsubscribe" => {
                if let Some(room) = room {
                    if let Some(r) = self.rooms.get_mut(room) {
                        r.awaiting = r.awaiting.saturating_sub(1);
                        if !r.wanted && r.awaiting == 0 {
                            self.rooms.remove(room);
                        }
                    }
                    if kind == b"subscribe" && self.resubscribing > 0 {
                        // Confirmations come in the order of the SUBSCRIBEs: the first ones
                        // after a reconnection are that burst's.
                        self.resubscribing -= 1;
                        if self.resubscribing == 0 {
                            self.start_catch_ups(now);
                        }
                    }
                    self.release_ready(now);
                }
            }
            _ => {}
        }
        Ok(())
    }

    // ----- catching up after a reconnection -----

    /// A delivery from `Sub`: to the core, or, while catching up, to wait behind what the
    /// catch-ups bring back.
    fn push_sub(&mut self, d: Delivery, seq: u64) {
        if self.stalling {
            self.stalled.push((d, seq));
        } else {
            self.deliveries.push_back(d);
        }
    }

    /// A room message numbered `seq` (0: a node of an older version published it) arrived
    /// live. A number more than one past the room's last means messages went by while this
    /// node could not receive them and no catch-up counted them (one could not be sent, or
    /// failed): counted here.
    fn count_gap(&mut self, room: &str, seq: u64, msg_id: u64) {
        let Some(r) = self.rooms.get_mut(room).filter(|_| seq > 0) else {
            return;
        };
        if let (None, Some((last, _))) = (r.catchup, r.last) {
            if seq > last + 1 {
                let missed = seq - last - 1;
                self.stats.missed += missed;
                log::warn!(
                    "cluster: {missed} messages in room {} went by while this node could not \
                     receive them",
                    crate::untrusted::Untrusted(room)
                );
            }
        }
        r.last = Some((seq, msg_id));
    }

    /// Every room subscribed again after a reconnection is confirmed: each room that was
    /// received before asks what it missed (`chatloop_catchup`: the room's count now, and
    /// with `--history` the messages after the last one received). What arrives meanwhile
    /// keeps waiting.
    fn start_catch_ups(&mut self, now: Instant) {
        if !self.links[0].connected {
            self.finish_catch_up();
            return;
        }
        let rooms: Vec<(Box<str>, u64)> = self
            .rooms
            .iter()
            .filter_map(|(n, r)| Some((n.clone(), r.catchup.filter(|_| r.wanted)?.1)))
            .collect();
        let own = format!("{WHISPER_CHANNEL}{}", self.ident);
        let budget = (CATCHUP_BYTES / rooms.len().max(1)).to_string();
        let limit = HISTORY_PAGE.to_string();
        for (room, since) in rooms {
            let seq = format!("{SEQ_KEY}{room}");
            let stream = format!("{HISTORY_KEY}{room}");
            let since = since.to_string();
            let mut args: Vec<&[u8]> = vec![b"FCALL", b"chatloop_catchup", b"1", seq.as_bytes()];
            if self.history.0 > 0 {
                args[2] = b"2";
                args.push(stream.as_bytes());
            }
            args.extend([
                own.as_bytes(),
                room.as_bytes(),
                since.as_bytes(),
                limit.as_bytes(),
                budget.as_bytes(),
            ]);
            self.command(now, Pending::CatchUp, &args);
            self.catchups += 1;
        }
        if self.catchups == 0 {
            self.finish_catch_up();
        }
    }

    /// A catch-up's answer: the room's count `seq` when Redis ran it, and the messages of
    /// its history after the last one received. The count says how many were missed: those
    /// after the last received, less the ones that arrived live since the subscription (they
    /// are `stalled`). Of the history, what came before the first of those is what was
    /// missed; what follows it is a copy of what is stalled.
    fn handle_catch_up(&mut self, room: &str, seq: u64, entries: Entries) {
        let from = self
            .rooms
            .get_mut(room)
            .filter(|r| r.wanted)
            .and_then(|r| r.catchup.take());
        if let Some((last_seq, last_id)) = from {
            let mut live = 0;
            let mut first_live = None;
            for (d, s) in &self.stalled {
                if let Delivery::Message {
                    room: r, msg_id, ..
                } = d
                {
                    if r == room {
                        first_live.get_or_insert(*msg_id);
                        live += u64::from(*s > 0 && *s <= seq);
                    }
                }
            }
            // A count below the last one seen started again (it expired, or Redis lost its
            // data): what went by then cannot be counted, but what the history kept after
            // the last message received was missed all the same.
            let counted = if seq >= last_seq {
                (seq - last_seq).saturating_sub(live)
            } else {
                0
            };
            let missed: Entries = entries
                .into_iter()
                .filter(|(id, _, _)| *id > last_id && first_live.is_none_or(|f| *id < f))
                .collect();
            self.stats.missed += counted.max(missed.len() as u64);
            let newest = missed.last().map_or(last_id, |e| e.0);
            let name: Box<str> = room.into();
            self.recovered.extend(
                missed
                    .into_iter()
                    .map(|(id, from, text)| (id, name.clone(), from, text)),
            );
            // A room with nothing live yet starts from what the catch-up saw, so that the next
            // cut is caught up, or counted, from here.
            if let Some(r) = self.rooms.get_mut(room) {
                r.last = r.last.or(Some((seq, newest)));
            }
        }
        self.catch_up_answered();
    }

    fn catch_up_answered(&mut self) {
        self.catchups = self.catchups.saturating_sub(1);
        if self.catchups == 0 && self.resubscribing == 0 {
            self.finish_catch_up();
        }
    }

    /// The catch-ups are answered (or can no longer be): the recovered messages go to the
    /// core, merged with what waited so that msg_ids still increase on every connection
    /// and each room keeps its order. What waited arrived in the order Redis ran it, and a
    /// room's recovered messages were all published before its subscription, so before
    /// anything of that room that waited: each room's recovered messages go before its
    /// first waiting item, and every recovered message before the first waiting message
    /// with a higher id.
    fn finish_catch_up(&mut self) {
        if !self.stalling {
            return;
        }
        self.stalling = false;
        self.stall_since = None;
        for (name, r) in self.rooms.iter_mut() {
            // Not caught up (a link failed, or Redis refused): a room that received nothing
            // since starts from where it was, and a later message's number counts the gap;
            // one that did counts the gap before its first live message now.
            let Some(from) = r.catchup.take() else {
                continue;
            };
            let from_seq = from.0;
            let first_live = self.stalled.iter().find_map(|(d, s)| match d {
                Delivery::Message { room, .. } if *s > 0 && room.as_str() == &**name => Some(*s),
                _ => None,
            });
            match first_live {
                Some(s) if s > from_seq + 1 => self.stats.missed += s - from_seq - 1,
                Some(_) => {}
                None => r.last = r.last.or(Some(from)),
            }
        }
        let mut recovered = std::mem::take(&mut self.recovered);
        recovered.sort_unstable_by_key(|e| e.0);
        let delivered = self.delivered;
        recovered.retain(|e| e.0 > delivered);
        self.stats.recovered += recovered.len() as u64;
        let missed = self.stats.missed - self.missed_before;
        if missed > 0 {
            log::warn!(
                "cluster: {missed} room messages were published while this node could not \
                 receive them; {} of them delivered late from the rooms' history",
                recovered.len()
            );
        }
        let mut newest: HashMap<Box<str>, u64> = HashMap::new();
        for (id, room, _, _) in &recovered {
            newest.insert(room.clone(), *id);
        }
        let mut recovered = recovered.into_iter().peekable();
        let mut emit_upto = |bound: u64, out: &mut VecDeque<Delivery>| {
            while let Some((id, room, from, text)) = recovered.next_if(|e| e.0 <= bound) {
                out.push_back(Delivery::Message {
                    room: room.into(),
                    msg_id: id,
                    from,
                    text,
                });
            }
        };
        for (d, _) in std::mem::take(&mut self.stalled) {
            let bound = match &d {
                Delivery::Message { room, msg_id, .. } => newest
                    .get(room.as_str())
                    .copied()
                    .unwrap_or(0)
                    .max(msg_id.saturating_sub(1)),
                Delivery::Presence { room, .. } => newest.get(room.as_str()).copied().unwrap_or(0),
                Delivery::Whisper { msg_id, .. } => msg_id.saturating_sub(1),
                _ => 0,
            };
            emit_upto(bound, &mut self.deliveries);
            self.deliveries.push_back(d);
        }
        emit_upto(u64::MAX, &mut self.deliveries);
    }
}

/// Appends one command, as a RESP array of bulk strings.
fn push_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let frame = OwnedFrame::Array(
        args.iter()
            .map(|a| OwnedFrame::BulkString(a.to_vec()))
            .collect(),
    );
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    // The buffer was sized by the encoder itself, so this cannot fail.
    let n = encode(&mut out[start..], &frame, false).unwrap_or(0);
    out.truncate(start + n);
}

/// A message, `<id>:<seq>:<from length byte><from><text>` as `chatloop_say` publishes it
/// (`<seq>:` absent from a node of an older version: 0), or a PRESENCE, `P<kind><nick>`;
/// with the message's number in its room.
fn parse_payload(room: &str, p: &[u8]) -> Option<(Delivery, u64)> {
    if let [b'P', kind, rest @ ..] = p {
        let colon = rest.iter().position(|&b| b == b':')?;
        let d = Delivery::Presence {
            room: room.to_string(),
            kind: PresenceKind::from_u8(kind.checked_sub(b'0')?)?,
            members: std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?,
            nick: std::str::from_utf8(&rest[colon + 1..]).ok()?.to_string(),
        };
        return Some((d, 0));
    }
    let colon = p.iter().position(|&b| b == b':')?;
    let msg_id = std::str::from_utf8(&p[..colon]).ok()?.parse().ok()?;
    let mut rest = &p[colon + 1..];
    // A nick's length byte is at most 32, never an ASCII digit: digits then `:` are the
    // room's count.
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut seq = 0;
    if digits > 0 && rest.get(digits) == Some(&b':') {
        seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        rest = &rest[digits + 1..];
    }
    let n = usize::from(*rest.first()?);
    let from = std::str::from_utf8(rest.get(1..1 + n)?).ok()?;
    let text = std::str::from_utf8(rest.get(1 + n..)?).ok()?;
    let d = Delivery::Message {
        room: room.to_string(),
        msg_id,
        from: from.to_string(),
        text: text.to_string(),
    };
    Some((d, seq))
}

/// `G<seq>:<room>\n` then the entries as [`parse_entries`] reads them, as
/// `chatloop_catchup` answers.
fn parse_catch_up(p: &[u8]) -> Option<(String, u64, Entries)> {
    let nl = p.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&p[1..nl]).ok()?;
    let (seq, room) = head.split_once(':')?;
    Some((
        room.to_string(),
        seq.parse().ok()?,
        parse_entries(&p[nl + 1..])?,
    ))
}

/// A HISTORY that got no answer: nothing known to be kept.
fn lost_history(conn: ConnId, room: &str) -> Delivery {
    Delivery::History {
        conn,
        room: room.to_string(),
        entries: Vec::new(),
        floor: 0,
        cut: false,
        lost: true,
    }
}

/// `R<conn>:<floor>:<cut>:<room>\n` then, per message, `<msg_id> <length> <payload>` with
/// the payload as `chatloop_say` publishes it, as `chatloop_history` answers.
fn parse_history(p: &[u8]) -> Option<Delivery> {
    let nl = p.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&p[1..nl]).ok()?;
    let mut fields = head.splitn(4, ':');
    let conn = ConnId::from_u64(fields.next()?.parse().ok()?)?;
    let floor = fields.next()?.parse().ok()?;
    let cut = fields.next()? == "1";
    let room = fields.next()?.to_string();
    Some(Delivery::History {
        conn,
        room,
        entries: parse_entries(&p[nl + 1..])?,
        floor,
        cut,
        lost: false,
    })
}

/// Kept messages, oldest first: (msg_id, from, text).
type Entries = Vec<(u64, String, String)>;

/// `<msg_id> <length> <payload>` repeated, each payload `<from length byte><from><text>`.
fn parse_entries(mut rest: &[u8]) -> Option<Entries> {
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let mut number = || -> Option<usize> {
            let sp = rest.iter().position(|&b| b == b' ')?;
            let n = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
            rest = &rest[sp + 1..];
            Some(n)
        };
        let msg_id = number()? as u64;
        let len = number()?;
        let payload = rest.get(..len)?;
        rest = &rest[len..];
        let n = usize::from(*payload.first()?);
        let from = std::str::from_utf8(payload.get(1..1 + n)?).ok()?;
        let text = std::str::from_utf8(payload.get(1 + n..)?).ok()?;
        entries.push((msg_id, from.to_string(), text.to_string()));
    }
    Some(entries)
}

/// Nicks compare ASCII case folded (PROTOCOL.md 5.1), in Redis as in the core.
fn fold(nick: &str) -> Box<str> {
    nick.to_ascii_lowercase().into_boxed_str()
}

/// `<id>:<to length><to><from length><from><text>`, as `chatloop_whisper` publishes it.
fn parse_whisper(p: &[u8]) -> Option<Delivery> {
    let colon = p.iter().position(|&b| b == b':')?;
    let msg_id = std::str::from_utf8(&p[..colon]).ok()?.parse().ok()?;
    let mut rest = &p[colon + 1..];
    let mut field = || -> Option<String> {
        let n = usize::from(*rest.first()?);
        let s = std::str::from_utf8(rest.get(1..1 + n)?).ok()?.to_string();
        rest = &rest[1 + n..];
        Some(s)
    };
    let to = field()?;
    let from = field()?;
    let text = std::str::from_utf8(rest).ok()?.to_string();
    Some(Delivery::Whisper {
        msg_id,
        from,
        to,
        text,
    })
}

/// What processes tell each other about sessions on their channels: `T<conn>:<ident>\n<token>`
/// (a takeover request from process `ident` for its connection `conn`), `H<conn>:<nick>\n<rooms,
/// one per line>` (the session, handed over), `N<conn>` (no such session here).
fn parse_session_message(p: &[u8]) -> Option<Delivery> {
    let (&kind, rest) = p.split_first()?;
    let conn_end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    let conn: u64 = std::str::from_utf8(&rest[..conn_end]).ok()?.parse().ok()?;
    let body = rest.get(conn_end + 1..).unwrap_or_default();
    match kind {
        // 1: delivered; 2: its node was not there to receive it (counted, the sender not
        // told: as far as it can know, the nick was online).
        b'X' => Some(Delivery::WhisperResult {
            conn: ConnId::from_u64(conn)?,
            delivered: body != b"0",
        }),
        b'W' => {
            let text = std::str::from_utf8(body).ok()?;
            let mut lines = text.split('\n');
            let room = lines.next()?.to_string();
            let nicks = lines
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect();
            Some(Delivery::Who {
                conn: ConnId::from_u64(conn)?,
                room,
                nicks,
            })
        }
        b'B' => Some(Delivery::Barrier {
            conn: ConnId::from_u64(conn)?,
        }),
        b'N' => Some(Delivery::ResumeFailed {
            conn: ConnId::from_u64(conn)?,
        }),
        b'T' => {
            let nl = body.iter().position(|&b| b == b'\n')?;
            let to = std::str::from_utf8(&body[..nl]).ok()?.to_string();
            let token: SessionToken = body.get(nl + 1..)?.try_into().ok()?;
            Some(Delivery::TakeoverRequest { token, to, conn })
        }
        b'H' => {
            // The session's lines, then `\n\0` and its held whispers (no name holds a NUL).
            let cut = body.windows(2).position(|w| w == b"\n\0");
            let (head, held) = match cut {
                Some(i) => (&body[..i], &body[i + 2..]),
                None => (body, &[][..]),
            };
            let text = std::str::from_utf8(head).ok()?;
            let mut lines = text.split('\n');
            let nick = lines.next()?.to_string();
            let rooms = lines
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect();
            Some(Delivery::Handover {
                conn: ConnId::from_u64(conn)?,
                nick,
                rooms,
                whispers: parse_entries(held)?,
            })
        }
        _ => None,
    }
}
