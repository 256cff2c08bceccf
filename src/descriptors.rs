//! Room for thousands of connections, made once at start: the open-files limit raised
//! and the process's descriptor table grown before any thread exists.
//!
//! Each client connection holds a descriptor, and so does its connection to the upstream.
//! Two things stand in the way of thousands of them:
//!
//! - the soft `RLIMIT_NOFILE`, 1,024 under many container runtimes, with a much higher
//!   hard limit that a process may raise its soft one to (as Go's runtime does for
//!   every program, and nginx's `worker_rlimit_nofile`);
//! - the kernel's descriptor table, which starts with 64 slots and doubles each time it
//!   fills. In a process with more than one thread, each doubling waits for an RCU grace
//!   period inside the `accept` or `connect` that crossed it (5 – 16 ms each, at 256 to
//!   8,192 descriptors, on the benchmark machine), and the serving thread that made the
//!   call serves nobody meanwhile. The first 1,000 streams through a fresh proxy crossed
//!   four of them: time to first byte 20 ms at p99, ten times nginx's, whose worker has
//!   one thread and never waits; 2 – 3 ms with the table grown (BENCHMARKS.md, "Long
//!   streams"). Grown in one step while the process has a single thread, the table costs
//!   no wait, and 8 bytes of kernel memory per slot.
//!
//! In: the connections the process may hold at once. Out: what was done, for the log
//! (which is not set up yet when this runs).

use std::os::fd::{AsRawFd, RawFd};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors per connection (the client's and the upstream's), and those the process
/// holds besides: listeners, idle upstream connections, its watches, the log.
const PER_CONNECTION: u64 = 2;
const BESIDES: u64 = 256;

/// What [`prepare`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// Descriptors the connections are expected to need.
    pub wanted: u64,
    /// The soft limit now (`None`: unlimited).
    pub limit: Option<u64>,
    /// The soft limit before, if it was raised.
    pub raised_from: Option<u64>,
    /// The table now has a slot for every descriptor below this (0: it could not be grown).
    pub table: u64,
}

impl Prepared {
    /// Logs what was done; a warning, saying what to do, when the limit leaves too few
    /// descriptors for the connections.
    pub fn log(&self) {
        let Prepared { wanted, limit, raised_from, table } = *self;
        match limit {
            Some(limit) if limit < wanted => tracing::warn!(
                limit,
                raised_from,
                wanted,
                "the open-files limit leaves room for fewer connections than --max-connections \
                 (two descriptors each); raise the container's nofile limit or lower --max-connections"
            ),
            _ => tracing::info!(limit, raised_from, table, wanted, "open-files limit and descriptor table ready"),
        }
    }
}

/// Raises the soft open-files limit to the hard one and grows the descriptor table for
/// `connections` (or as far as the limit allows). Call it before the process starts a
/// second thread: with one thread the table grows without waiting.
pub fn prepare(connections: usize) -> Prepared {
    let wanted = (connections as u64).saturating_mul(PER_CONNECTION).saturating_add(BESIDES);
    let before = getrlimit(Resource::Nofile);
    let below_hard = match (before.current, before.maximum) {
        (Some(soft), Some(hard)) => soft < hard,
        (Some(_), None) => true,
        (None, _) => false,
    };
    let mut raised_from = None;
    // Unlimited is refused for this limit (the kernel's `nr_open` caps it): kept as is then.
    if below_hard && setrlimit(Resource::Nofile, Rlimit { current: before.maximum, ..before }).is_ok() {
        raised_from = before.current;
    }
    let limit = getrlimit(Resource::Nofile).current;
    let table = grow_table(limit.map_or(wanted, |limit| wanted.min(limit)));
    Prepared { wanted, limit, raised_from, table }
}

/// Grows the table to hold descriptors below `slots`, by placing a copy of a descriptor
/// at `slots - 1` and closing it (the table never shrinks). Returns the slots ensured.
fn grow_table(slots: u64) -> u64 {
    let Ok(top) = RawFd::try_from(slots.saturating_sub(1)) else { return 0 };
    let Ok((reader, _writer)) = std::io::pipe() else { return 0 };
    match rustix::io::fcntl_dupfd_cloexec(&reader, top) {
        Ok(copy) => u64::try_from(copy.as_raw_fd()).map_or(0, |fd| fd + 1),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's own account of the table: `FDSize` in /proc/self/status.
    fn table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|line| line.strip_prefix("FDSize:")).unwrap();
        line.trim().parse().unwrap()
    }

    #[test]
    fn raises_the_limit_and_grows_the_table_for_the_connections() {
        let prepared = prepare(3_000);
        assert_eq!(prepared.wanted, 6_256);
        let now = getrlimit(Resource::Nofile);
        if now.maximum.is_some() {
            assert_eq!(now.current, now.maximum, "the soft limit is raised to the hard one");
        }
        assert_eq!(prepared.limit, now.current);
        let room = prepared.limit.map_or(prepared.wanted, |limit| limit.min(prepared.wanted));
        assert!(prepared.table >= room, "{prepared:?}");
        assert!(table_size() >= room, "the kernel's table has {} slots; {prepared:?}", table_size());
    }
}
