//! The serving threads beside the one `Server::run` is called on: one per further core, each
//! with a single-threaded tokio runtime accepting from a socket of its own on the same port.
//!
//! Why threads of their own rather than one work-stealing runtime: a proxied request is two
//! short exchanges on two sockets, and on a work-stealing runtime each wakeup of a task on
//! another worker (the upstream connection's task, the client connection's) is a futex wake and
//! a context switch, a large share of what a request costs. With a runtime per thread, a
//! client connection, its requests and the upstream connections they open stay on the thread
//! that accepted it, as nginx's worker processes do, while the budget, the pool's cap and the
//! cache stay shared. Each thread binds a socket of its own to the port (`SO_REUSEPORT`, see
//! `server::bind`), so the kernel spreads connections evenly; one shared socket hands most of
//! them to whichever thread wakes first. Measured on 2 cores, HTTP/1.1, 1,000 keys, one run:
//! 37.7-39.5 ms of CPU per 1,000 proxied requests on a 2-worker work-stealing runtime, 28.1-31.6
//! with two threads of their own, within 13% of a minimal hyper proxy (README, Performance).
//!
//! A worker's runtime outlives its own connections: it stops only once every thread has
//! drained, since a task it started (a connection to Redis, a cache fill) may serve requests of
//! another thread.

use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};

use super::Server;
use crate::proxy::Proxy;

/// The threads started beside the calling one.
pub(super) struct Pool {
    workers: Vec<Worker>,
    exit: watch::Sender<bool>,
}

struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// Whether its connections all finished within the grace period (sent once they have).
    drained: oneshot::Receiver<bool>,
}

impl Pool {
    /// Starts `server.workers - 1` threads serving `listener` until `stop` turns true. A thread
    /// that cannot start is logged and the listener is served by the others.
    pub(super) fn start(
        server: &Arc<Server>,
        listener: &TcpListener,
        proxy: &Proxy,
        slots: &Arc<Semaphore>,
        stop: &watch::Receiver<bool>,
    ) -> Self {
        let (exit, exiting) = watch::channel(false);
        let extra = server.cfg.workers.get().saturating_sub(1);
        let mut workers = Vec::new();
        for index in 1..=extra {
            match spawn(index, server, listener, proxy, slots, stop, &exiting) {
                Ok(worker) => workers.push(worker),
                Err(error) => {
                    tracing::warn!(%error, threads = index, "cannot start a serving thread; serving on fewer");
                    break;
                }
            }
        }
        Self { workers, exit }
    }

    /// Once this thread's connections are done (`drained`: within the grace period), waits for
    /// every worker's, then stops them. Returns whether all drained in time.
    pub(super) async fn finish(mut self, drained: bool) -> bool {
        let mut all = drained;
        for worker in &mut self.workers {
            all &= (&mut worker.drained).await.unwrap_or(true);
        }
        let _ = self.exit.send(true);
        for worker in self.workers {
            let _ = tokio::task::spawn_blocking(move || worker.thread.join()).await;
        }
        all
    }
}

/// One serving thread: its runtime is built here, so a failure is reported to the caller.
fn spawn(
    index: u32,
    server: &Arc<Server>,
    listener: &TcpListener,
    proxy: &Proxy,
    slots: &Arc<Semaphore>,
    stop: &watch::Receiver<bool>,
    exit: &watch::Receiver<bool>,
) -> std::io::Result<Worker> {
    // A socket of its own on the same address (see `server::bind`); if the listener was not
    // bound for that, a second descriptor of it (one accept queue for both threads).
    let addr = listener.local_addr()?;
    let shared = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (server, proxy, slots) = (server.clone(), proxy.clone(), slots.clone());
    let (mut stop, mut exit) = (stop.clone(), exit.clone());
    let (drained_tx, drained) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(format!("tmdb-proxy-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let own =
                    super::socket_for(addr, true).and_then(|s| s.listen(super::LISTEN_BACKLOG));
                let listener = own.or_else(|_| TcpListener::from_std(shared));
                let drained = match listener {
                    Ok(listener) => {
                        let stopped = async {
                            let _ = stop.wait_for(|stop| *stop).await;
                        };
                        server.serve_listener(listener, proxy, slots, stopped).await
                    }
                    Err(error) => {
                        tracing::warn!(%error, "a serving thread cannot use the listener");
                        true
                    }
                };
                let _ = drained_tx.send(drained);
                let _ = exit.wait_for(|exit| *exit).await;
            });
        })?;
    Ok(Worker { thread, drained })
}
