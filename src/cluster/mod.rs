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

/// Where Redis is, and how to log in: `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`
/// (user and password percent-decoded; no user: Redis's `default`). Its `Debug` and every
/// error about it hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Host name or address.
    pub host: String,
    /// Port (6379 if the URL has none).
    pub port: u16,
    /// Database for keys (pub/sub channels are global to the server whatever it is).
    pub db: u32,
    /// ACL user for `AUTH` (None: `AUTH password`, Redis's `default` user).
    pub user: Option<String>,
    /// Password for `AUTH` (None: no `AUTH`).
    pub password: Option<String>,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// `s` with the password of its credentials replaced, for messages.
fn redacted(s: &str) -> String {
    match (s.find("://"), s.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let cred = &s[scheme + 3..at];
            match cred.split_once(':') {
                Some((user, _)) => format!("{}{user}:<hidden>{}", &s[..scheme + 3], &s[at..]),
                None => format!("{}<hidden>{}", &s[..scheme + 3], &s[at..]),
            }
        }
        _ => s.to_string(),
    }
}

/// `%XX` escapes decoded (a password may hold `@`, `:` or `/` that way).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl std::str::FromStr for RedisUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        // Errors name the URL with its password hidden: they reach logs and terminals.
        let s = redacted(url);
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{s:?}: a cluster URL starts with redis://"))?;
        let (rest, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse()
                    .map_err(|_| format!("{s:?}: the database must be a number"))?,
            ),
            None => (rest, 0),
        };
        let (user, password, hostport) = match rest.rsplit_once('@') {
            Some((cred, hostport)) => {
                let (user, password) = cred
                    .split_once(':')
                    .ok_or_else(|| format!("{s:?}: credentials are USER:PASSWORD or :PASSWORD"))?;
                let decode = |v: &str| {
                    percent_decode(v)
                        .ok_or_else(|| format!("{s:?}: a bad %-escape in the credentials"))
                };
                let user = Some(decode(user)?).filter(|u| !u.is_empty());
                (user, Some(decode(password)?), hostport)
            }
            None => (None, None, rest),
        };
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
            user,
            password,
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
