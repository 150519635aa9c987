//! A cluster: several chatloop processes serve one chat through Redis (docs/CLUSTER.md).
//!
//! What crosses nodes: room messages, PRESENCE, nicks, whispers, WHO and resumes. A SAY
//! goes to Redis, which assigns its msg_id and publishes it; every node with members in the
//! room (the sender's too) delivers it on receipt, so a room's members see one order and one
//! id for each message, whichever node they are on. A new session's nick is claimed in Redis
//! under the node's lease before its WELCOME; a WHISPER goes to the process holding its nick;
//! rooms' members are kept in Redis under each node's lease, for WHO and for reaping a dead
//! node's members; a resume finds its session's process through Redis and takes the session
//! over (docs/CLUSTER.md).
//!
//! # Layout
//!
//! - `backbone`: the rules, sans-IO ([`Backbone`]): Redis links' bytes and `Instant`s in;
//!   RESP commands (encoded by the `redis-protocol` crate), deliveries for the core
//!   ([`Delivery`]) and deadlines out. Tested without Redis.
//! - `source`: the mio shell ([`BackboneSource`]): two non-blocking TCP connections in the
//!   caller's `Poll` under two tokens of its own, reconnected with backoff. No thread.
//!
//! The core meets it through [`Relay`](crate::core::Relay) (out) and
//! [`Chat::handle_remote_message`](crate::core::Chat::handle_remote_message) (in); the
//! binary moves one to the other every iteration ([`BackboneSource::exchange`]).

mod backbone;
mod source;

pub use backbone::{Backbone, BackboneStats, Delivery, HELD_PER_ROOM, Link, REPLY_TIMEOUT};
pub use source::BackboneSource;

/// Where Redis is: `redis://HOST:PORT[/DB]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Host name or address.
    pub host: String,
    /// Port (6379 if the URL has none).
    pub port: u16,
    /// Database for keys (pub/sub channels are global to the server whatever it is).
    pub db: u32,
}

impl std::str::FromStr for RedisUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{s:?}: a cluster URL starts with redis://"))?;
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse()
                    .map_err(|_| format!("{s:?}: the database must be a number"))?,
            ),
            None => (rest, 0),
        };
        if hostport.contains('@') {
            return Err(format!(
                "{s:?}: credentials in the URL are not supported yet"
            ));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (
                h,
                p.parse()
                    .map_err(|_| format!("{s:?}: the port must be a number"))?,
            ),
            _ => (hostport, 6379),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(RedisUrl {
            host: host.to_string(),
            port,
            db,
        })
    }
}

/// The default node name: the host's name and the process id, readable in logs.
pub fn default_node_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests;
