//! The open-files limit. Every client connection, upstream connection and admin connection holds
//! a file descriptor; when the process runs out, accept fails ("Too many open files") for every
//! listener at once.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors the process needs besides connections: listeners, the runtime, log and config
/// files, TLS roots.
const RESERVED: u64 = 64;

/// Raises the soft open-files limit to the hard one (the usual default soft limit, 1024, is far
/// below `server.max_connections`). Returns the soft limit now in force, or `None` if there is
/// none or it cannot be read.
pub fn raise_limit() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if raised.current != limit.current && setrlimit(Resource::Nofile, raised).is_ok() {
        return raised.current;
    }
    limit.current
}

/// Descriptors each serving thread holds besides its connections: its listening socket, its
/// runtime's epoll and wakeup descriptors, and an accepted connection waiting for a slot.
const PER_WORKER: u64 = 6;

/// Descriptors `connections` connections (client, upstream and admin together) may need at
/// once, served by `workers` threads.
pub fn needed(connections: u64, workers: u64) -> u64 {
    connections
        .saturating_add(RESERVED)
        .saturating_add(workers.saturating_mul(PER_WORKER))
}
