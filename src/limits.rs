//! The file-descriptor limit and the connection limit derived from it.
//!
//! As Redis derives maxclients from its fd limit, the server raises RLIMIT_NOFILE as far as it
//! may at startup and then serves at most the limit minus [`FD_RESERVE`] connections, so the
//! listener, the poll instance, the signal fd, the EMFILE reserve fd and log files always have
//! descriptors left.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept back from connections for the process's own use.
pub const FD_RESERVE: u64 = 32;

/// The linux kernel's default ceiling for RLIMIT_NOFILE (`fs.nr_open`), used when the hard
/// limit is "unlimited".
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// RLIMIT_NOFILE before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// (soft, hard) found at startup.
    pub before: (u64, u64),
    /// (soft, hard) in force afterwards.
    pub after: (u64, u64),
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and, when `wanted_conns` needs more and
/// the process is allowed to (CAP_SYS_RESOURCE), the hard limit too. Never lowers anything.
pub fn raise_nofile(wanted_conns: Option<usize>) -> nix::Result<FdLimits> {
    let before = getrlimit(Resource::RLIMIT_NOFILE)?;
    let (soft, hard) = before;
    let hard_cap = if hard == nix::sys::resource::RLIM_INFINITY {
        NR_OPEN_DEFAULT
    } else {
        hard
    };
    let need = wanted_conns.map(|n| n as u64 + FD_RESERVE);
    let mut after = before;
    // Only a privileged process may raise the hard limit; failing is expected otherwise.
    match need.filter(|&n| n > hard_cap) {
        Some(need) if setrlimit(Resource::RLIMIT_NOFILE, need, need).is_ok() => {
            after = (need, need);
        }
        _ if soft < hard_cap && setrlimit(Resource::RLIMIT_NOFILE, hard_cap, hard).is_ok() => {
            after = (hard_cap, hard);
        }
        _ => {}
    }
    Ok(FdLimits { before, after })
}

/// The connection limit to use: the one asked for, clamped to what the fd limit allows.
/// Returns the limit and, when it clamped, by how much.
pub fn connection_limit(soft_fd_limit: u64, asked: Option<usize>) -> (usize, Option<usize>) {
    let allowed = soft_fd_limit.saturating_sub(FD_RESERVE).max(1) as usize;
    match asked {
        Some(n) if n > allowed => (allowed, Some(n - allowed)),
        Some(n) => (n, None),
        None => (allowed, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_derived_and_clamped() {
        assert_eq!(connection_limit(1024, None), (992, None));
        assert_eq!(connection_limit(1024, Some(10)), (10, None));
        assert_eq!(connection_limit(1024, Some(5000)), (992, Some(4008)));
        assert_eq!(connection_limit(10, None), (1, None));
    }

    #[test]
    fn raising_never_lowers() {
        let l = raise_nofile(None).expect("getrlimit works");
        assert!(l.after.0 >= l.before.0);
        assert!(l.after.1 >= l.before.1);
    }
}
