//! `attack`: hostile clients, as issue 13 ("Isolation under hostile load") names them, run
//! against a server on this machine. Each attack reports what the server did (an honest
//! client's latency, what was cut, memory, the slowest loop iteration, a scraper's success
//! ratio) and never judges it: the bounds are the and docs/RELIABILITY.md's, and
//! `benches/isolation.sh` puts the figures of chatloop and the async version side by side.
//!
//! | module | one job |
//! |---|---|
//! | `amp` | fan-out amplification: non-reading members with tiny receive buffers, a flooder |
//! | `partial` | connections holding an incomplete frame: the server's memory per connection |
//! | `slowheaders` | slow request heads on the metrics port against a /healthz scraper |
//! | `honest` | the honest pair: latency and losses of two ordinary clients, by phase |
//! | `handshake` | a blocking HELLO/JOIN for connections driven by hand |
//! | `watch` | sampling the server's RSS and /metrics on a thread; recovery figures |
//! | `http` | a blocking HTTP/1.0 GET and the Prometheus text |

mod amp;
mod handshake;
mod honest;
mod http;
mod partial;
mod slowheaders;
mod watch;

use super::cli::AttackCmd;
use super::report::{Fail, Report};

/// Runs the chosen attack.
pub fn run(cmd: &AttackCmd, progress: bool) -> Result<Report, Fail> {
    match cmd {
        AttackCmd::Amp(a) => amp::amp(a, progress),
        AttackCmd::Partial(a) => partial::partial(a, progress),
        AttackCmd::Slowheaders(a) => slowheaders::slowheaders(a, progress),
    }
}
