//! The serving threads: `server.workers` of them, each with a single-threaded tokio runtime
//! accepting from a socket of its own on the same port. The thread `Server::run` is called on
//! keeps the admin listener and the background tasks.
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

/// Most threads each serving runtime may start for blocking work (DNS lookups, compressing a
/// large cache entry): with a runtime per core, tokio's default of 512 each would multiply.
const MAX_BLOCKING_THREADS: usize = 16;

/// The serving threads.
pub(super) struct Pool {
    workers: Vec<Worker>,
    exit: watch::Sender<bool>,
    /// Whether the first thread serves the caller's listening socket (else the caller must).
    holds_listener: bool,
}

struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// Whether its connections all finished within the grace period (sent once they have).
    drained: oneshot::Receiver<bool>,
}

/// Where a serving thread accepts from.
enum Socket {
    /// The caller's listening socket (a second descriptor of it), handed over whole: the
    /// connections already in its queue are served, not reset.
    Given(std::net::TcpListener),
    /// A socket of its own on the same address (see `server::bind`), or, if the caller's was
    /// not bound for that, the caller's.
    Own(std::net::SocketAddr, std::net::TcpListener),
}

impl Pool {
    /// Starts `server.workers` threads serving `listener`'s address until `stop` turns true, and
    /// waits until each accepts. One that cannot start is logged, and no more are tried; if
    /// none could, [`Pool::holds_listener`] is false and the caller serves the listener.
    pub(super) async fn start(
        server: &Arc<Server>,
        listener: &TcpListener,
        proxy: &Proxy,
        slots: &Arc<Semaphore>,
        stop: &watch::Receiver<bool>,
    ) -> Self {
        let (exit, exiting) = watch::channel(false);
        let mut pool = Self {
            workers: Vec::new(),
            exit,
            holds_listener: false,
        };
        for index in 0..server.cfg.workers.get() {
            let socket = match socket_for(index, listener) {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::warn!(%error, index, "cannot share the listener with a serving thread");
                    break;
                }
            };
            let serving = (server.clone(), proxy.clone(), slots.clone());
            match spawn(index, socket, serving, stop.clone(), exiting.clone()).await {
                Ok(worker) => pool.workers.push(worker),
                Err(error) => {
                    tracing::warn!(%error, index, "cannot start a serving thread; serving on fewer");
                    break;
                }
            }
            pool.holds_listener = true;
        }
        pool
    }

    /// Whether the serving threads hold the caller's listener (at least one started).
    pub(super) fn holds_listener(&self) -> bool {
        self.holds_listener
    }

    /// Once the caller's own connections are done (`drained`: within the grace period), waits
    /// for every thread's, then stops them. Returns whether all drained in time.
    pub(super) async fn finish(mut self, drained: bool) -> bool {
        let mut all = drained;
        for worker in &mut self.workers {
            // A thread that ended without saying (it panicked) had its connections cut.
            all &= (&mut worker.drained).await.unwrap_or(false);
        }
        let _ = self.exit.send(true);
        for worker in self.workers {
            let name = worker.thread.thread().name().unwrap_or("-").to_owned();
            if let Ok(Err(_)) = tokio::task::spawn_blocking(move || worker.thread.join()).await {
                tracing::error!(thread = %name, "a serving thread panicked");
            }
        }
        all
    }
}

/// The first thread is given the caller's socket; the others bind their own.
fn socket_for(index: u32, listener: &TcpListener) -> std::io::Result<Socket> {
    let shared = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    Ok(match index {
        0 => Socket::Given(shared),
        _ => Socket::Own(listener.local_addr()?, shared),
    })
}

/// One serving thread. Its runtime is built on the thread itself, so nothing of it is dropped
/// on the caller's (async) thread if the thread cannot start; it reports once it accepts.
async fn spawn(
    index: u32,
    socket: Socket,
    (server, proxy, slots): (Arc<Server>, Proxy, Arc<Semaphore>),
    mut stop: watch::Receiver<bool>,
    mut exit: watch::Receiver<bool>,
) -> std::io::Result<Worker> {
    let (ready_tx, ready) = oneshot::channel::<std::io::Result<()>>();
    let (drained_tx, drained) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(format!("tmdb-proxy-{index}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(MAX_BLOCKING_THREADS)
                .build();
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match socket {
                    Socket::Given(socket) => TcpListener::from_std(socket),
                    Socket::Own(addr, shared) => super::socket_for(addr, true)
                        .and_then(|own| own.listen(super::LISTEN_BACKLOG))
                        .or_else(|_| TcpListener::from_std(shared)),
                };
                let listener = match listener {
                    Ok(listener) => listener,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let stopped = async {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                let drained = server.serve_listener(listener, proxy, slots, stopped).await;
                let _ = drained_tx.send(drained);
                let _ = exit.wait_for(|exit| *exit).await;
            });
        })?;
    match ready.await {
        Ok(Ok(())) => Ok(Worker { thread, drained }),
        Ok(Err(error)) => {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            Err(error)
        }
        Err(_) => Err(std::io::Error::other("the serving thread ended at start")),
    }
}
