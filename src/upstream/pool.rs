//! The upstream connection pool: HTTP/1.1 keep-alive connections, at most `max_connections` open.
//!
//! Written here rather than taken from hyper-util's client because the rate guarantee needs two
//! things that pool does not give: a hard cap on open connections (TMDB's edge allows about 20 per
//! client IP; hyper-util opens a new connection whenever no idle one is ready), and a connection
//! in hand that is *ready* before the request's token is confirmed, so the time a token is stamped
//! is the time the request goes on the wire, not the time it started waiting for a connection or a
//! TLS handshake (see `proxy::admission`).
//!
//! Invariant: every open connection is either held with one of `max_connections` permits (by a
//! [`Lease`], or by a connect under way) or idle, and idle connections never outnumber the free
//! permits. A connection is created only with a permit and after every idle one was tried: one
//! still finishing its exchange is waited for briefly, then closed. A connection that carried a
//! request body is retired after its response rather than reused, its permit held until the
//! upstream has closed its end (see [`Conn::retire`]). A [`Conn`] dropped anywhere closes its socket at once, so busy + idle
//! connections never exceed the cap, at any instant.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::connect::{Connector, Io};
use super::slots::{Slot, Slots, Standing, Tenant};
use super::{UpstreamBody, UpstreamError};

/// How long a pooled connection may take to become ready again after its last response.
const READY_WAIT: Duration = Duration::from_millis(250);

type Sender = SendRequest<UpstreamBody>;

/// Longest a retired connection keeps its slot while the upstream takes in the rest of an upload
/// and closes its end (see [`Conn::retire`]).
const RETIRE_LIMIT: Duration = Duration::from_secs(1);

/// One upstream connection: the handle requests are sent on, and the task that drives it.
/// Dropping it closes the connection at once (the task is aborted), whatever it was doing.
struct Conn {
    sender: Sender,
    task: Driver,
    /// The thread whose runtime drives it: requests on that thread take it first, so its
    /// wakeups stay on one thread (see `server::workers`).
    home: ThreadId,
    /// Hands the task the slot (and the handle) to wind the connection down with.
    retire: oneshot::Sender<(Slot, Sender)>,
}

/// The task driving a connection, aborted when dropped unless the connection was retired.
struct Driver(Option<AbortHandle>);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

impl Conn {
    /// Ends the connection without reusing it and without cutting it: the exchange in flight
    /// finishes (an upload the upstream answered early is written out), the proxy closes its
    /// end, and `slot` is held until the upstream has closed its end too, or for
    /// [`RETIRE_LIMIT`]. An upstream slow to take in an upload thus never sees more than
    /// `max_connections` connections, counting the ones it has yet to notice are closed.
    fn retire(self, slot: Slot) {
        let Self {
            sender,
            mut task,
            retire,
            ..
        } = self;
        if retire.send((slot, sender)).is_ok() {
            task.0 = None;
        }
        // Else the task has ended already: the connection is gone and the slot drops here.
    }
}

/// Drives one connection until it ends, or, once retired, until it has wound down: see
/// [`Conn::retire`].
async fn drive(
    mut conn: http1::Connection<Box<dyn Io>, UpstreamBody>,
    retired: oneshot::Receiver<(Slot, Sender)>,
) {
    let retired = tokio::select! {
        ended = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
            if let Err(error) = ended {
                tracing::debug!(error = %chain(&error), "upstream connection ended with an error");
            }
            return;
        }
        retired = retired => retired,
    };
    // Without a slot, the handle was dropped unretired, which aborts this task.
    let Ok((slot, mut sender)) = retired else {
        return;
    };
    let wind_down = async move {
        // Until the exchange in flight is complete (the upload written out), then without the
        // handle, until the connection is done. hyper's dispatcher writes, then flushes: when
        // the last of an upload leaves in a flush, it sees itself idle only on its next poll,
        // and nothing wakes it for that one, so each wake polls it twice.
        let in_flight = std::future::poll_fn(|cx| {
            for _ in 0..2 {
                if let Poll::Ready(ended) = conn.poll_without_shutdown(cx) {
                    return Poll::Ready(Some(ended));
                }
                if sender.poll_ready(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        });
        if let Some(ended) = in_flight.await {
            return ended;
        }
        drop(sender);
        std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await?;
        let mut io = TokioIo::new(conn.into_parts().io);
        let _ = io.shutdown().await;
        // Whatever the upstream still sends is discarded until it closes.
        let mut scrap = [0u8; 4096];
        while matches!(io.read(&mut scrap).await, Ok(n) if n > 0) {}
        Ok(())
    };
    let _ = tokio::time::timeout(RETIRE_LIMIT, wind_down).await;
    drop(slot);
}

struct Idle {
    conn: Conn,
    since: Instant,
}

pub(super) struct Inner {
    connector: Connector,
    target: Uri,
    idle: Mutex<Vec<Idle>>,
    slots: Arc<Slots>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Response bodies that broke after their headers had gone to the client.
    broken_bodies: Arc<AtomicU64>,
}

/// How the pool's connections are used, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    pub busy: usize,
    pub idle: usize,
    pub max: usize,
}

/// The pool. Cheap to clone.
#[derive(Clone)]
pub(super) struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.inner.target)
            .field("idle", &lock(&self.inner.idle).len())
            .field("slots", &self.inner.slots.load())
            .finish()
    }
}

fn lock(idle: &Mutex<Vec<Idle>>) -> MutexGuard<'_, Vec<Idle>> {
    idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// Connections held by requests (or being opened or wound down), idle ones, and the cap.
    pub(super) fn connections(&self) -> Connections {
        let (free, _) = self.inner.slots.load();
        let max = self.inner.slots.max();
        Connections {
            busy: max.saturating_sub(free),
            idle: lock(&self.inner.idle).len(),
            max,
        }
    }

    pub(super) fn new(
        connector: Connector,
        target: Uri,
        max_connections: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
        broken_bodies: Arc<AtomicU64>,
    ) -> Self {
        let inner = Arc::new(Inner {
            connector,
            target,
            idle: Mutex::new(Vec::new()),
            slots: Slots::new(max_connections),
            connect_timeout,
            idle_timeout,
            broken_bodies,
        });
        spawn_reaper(Arc::downgrade(&inner), idle_timeout);
        Self { inner }
    }

    /// A ready connection for a request of `tenant`: an idle one if any is usable, else a new one,
    /// once a slot is free (in turn between the keys waiting; see `slots`).
    pub(super) async fn checkout(
        &self,
        tenant: Tenant,
        standing: Standing,
    ) -> Result<Lease, UpstreamError> {
        let slot = self.inner.slots.acquire(tenant, standing).await?;
        if let Some(conn) = self.inner.take_idle().await {
            return Ok(Lease::new(conn, slot, &self.inner, true));
        }
        // The connect runs in a task of its own, holding the slot: if this request gives up
        // meanwhile, the connection is not wasted (nor its TLS handshake aborted) but goes idle
        // for the next one.
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let connected = inner.connect().await;
            if let Err((Ok(conn), slot)) = tx.send((connected, slot)) {
                inner.put_idle(conn);
                drop(slot);
            }
        });
        match rx.await {
            Ok((Ok(conn), slot)) => Ok(Lease::new(conn, slot, &self.inner, false)),
            Ok((Err(error), _)) => Err(error),
            Err(_) => Err(UpstreamError::Failed("connect task ended".into())),
        }
    }
}

impl Inner {
    /// Takes idle connections, most recently used first and this thread's own before others',
    /// until one is ready.
    async fn take_idle(&self) -> Option<Conn> {
        let here = std::thread::current().id();
        loop {
            let Idle { mut conn, since } = {
                let mut idle = lock(&self.idle);
                let last = idle.len().checked_sub(1)?;
                let at = idle.iter().rposition(|i| i.conn.home == here);
                idle.remove(at.unwrap_or(last))
            };
            if since.elapsed() >= self.idle_timeout || conn.sender.is_closed() {
                continue;
            }
            if conn.sender.is_ready() {
                return Some(conn);
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, conn.sender.ready()).await {
                return Some(conn);
            }
        }
    }

    /// TCP connect, TLS handshake (for https) and HTTP/1 handshake, within `connect_timeout`.
    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let connect = async {
            let io = self.connector.open(&self.target).await?;
            let (sender, conn) = http1::Builder::new()
                .handshake::<_, UpstreamBody>(io)
                .await
                .map_err(|e| UpstreamError::Failed(chain(&e)))?;
            let (retire, retired) = oneshot::channel();
            let task = tokio::spawn(drive(conn, retired));
            Ok::<_, UpstreamError>(Conn {
                sender,
                task: Driver(Some(task.abort_handle())),
                home: std::thread::current().id(),
                retire,
            })
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
    }

    fn put_idle(&self, conn: Conn) {
        if !conn.sender.is_closed() {
            lock(&self.idle).push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// Closes idle connections past `idle_timeout`, until the pool is dropped.
fn spawn_reaper(inner: Weak<Inner>, idle_timeout: Duration) {
    let every = (idle_timeout / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { break };
            lock(&inner.idle).retain(|idle| {
                idle.since.elapsed() < idle_timeout && !idle.conn.sender.is_closed()
            });
        }
    });
}

/// Every cause of an error, joined, so logs say "connection refused" and not just "connect error".
pub(super) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// A ready connection, held by one request until its response body ends.
///
/// Dropped without sending, the connection goes back to the pool; dropped after a request, it goes
/// back only if the exchange ended cleanly.
pub struct Lease {
    conn: Option<Conn>,
    slot: Option<Slot>,
    pool: Weak<Inner>,
    /// Taken from the idle list (so it may have been closed by the upstream meanwhile).
    reused: bool,
    /// Whether the connection may go back to the pool when the lease is dropped.
    reusable: bool,
    /// The request sent had a body. Its connection is retired rather than reused: an upstream
    /// may answer before it has read an upload and read it only later, and over TCP the proxy
    /// cannot tell. The next request on that connection would reach it only then, later than its
    /// rate token was confirmed for, and crowd a window at the upstream.
    carried_body: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("reused", &self.reused)
            .finish()
    }
}

impl Lease {
    fn new(conn: Conn, slot: Slot, pool: &Arc<Inner>, reused: bool) -> Self {
        Self {
            conn: Some(conn),
            slot: Some(slot),
            pool: Arc::downgrade(pool),
            reused,
            reusable: true,
            carried_body: false,
        }
    }

    /// Sends `req` and waits for the response headers. A pooled connection the upstream closed
    /// while idle fails before the request is written: the lease then takes a fresh connection
    /// and hands the request back ([`Sent::Stale`]), since it would now leave later than its
    /// rate token was confirmed for.
    pub(super) async fn send(mut self, req: Request<UpstreamBody>) -> Result<Sent, UpstreamError> {
        let Some(mut conn) = self.conn.take() else {
            return Err(UpstreamError::Failed("connection already used".into()));
        };
        self.reusable = false;
        self.carried_body = !req.body().is_end_stream();
        match conn.sender.try_send_request(req).await {
            Ok(response) => {
                self.conn = Some(conn);
                Ok(Sent::Answered(response.map(|body| LeasedBody {
                    body,
                    lease: Some(self),
                })))
            }
            Err(mut error) => match (self.reused, error.take_message()) {
                (true, Some(req)) => {
                    tracing::debug!(error = %chain(error.error()), "pooled connection was stale; reconnecting");
                    drop(conn);
                    let pool = self
                        .pool
                        .upgrade()
                        .ok_or_else(|| UpstreamError::Failed("connection pool closed".into()))?;
                    self.conn = Some(pool.connect().await?);
                    self.reused = false;
                    self.reusable = true;
                    Ok(Sent::Stale(self, req))
                }
                _ => Err(UpstreamError::from_hyper(error.error())),
            },
        }
    }

    /// Ends the exchange: the connection goes back to the pool only if it completed cleanly.
    fn finish(mut self, reusable: bool) {
        self.reusable = reusable;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (Some(conn), Some(slot)) = (self.conn.take(), self.slot.take()) else {
            return;
        };
        match (self.reusable, self.carried_body, self.pool.upgrade()) {
            // Idle, its slot freed: the next checkout takes it, waiting (briefly) for it to be
            // ready if its exchange is still finishing, or closes it.
            (true, false, Some(pool)) => {
                pool.put_idle(conn);
                drop(slot);
            }
            (true, true, _) => conn.retire(slot),
            // The connection closes as it drops, and the slot is freed after.
            _ => {
                drop(conn);
                drop(slot);
            }
        }
    }
}

/// What became of a request handed to [`Lease::send`].
#[derive(Debug)]
pub enum Sent {
    /// The upstream answered (its headers; the body follows).
    Answered(Response<LeasedBody>),
    /// The pooled connection was stale: nothing was sent. The lease holds a fresh connection now;
    /// the request is to be confirmed and sent again.
    Stale(Lease, Request<UpstreamBody>),
}

/// The upstream's response body, holding its connection's lease until the body ends.
pub struct LeasedBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl std::fmt::Debug for LeasedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedBody").finish()
    }
}

impl LeasedBody {
    /// Reads the whole body if it is at most `limit` bytes and arrives by `deadline` (an error
    /// body, to be inspected). `Ok(None)`: it is longer. The connection is released either way.
    pub async fn read_bounded(
        self,
        limit: usize,
        deadline: Instant,
    ) -> Result<Option<Bytes>, UpstreamError> {
        match tokio::time::timeout_at(deadline, Limited::new(self, limit).collect()).await {
            Err(_) => Err(UpstreamError::BodyTimeout),
            Ok(Ok(collected)) => Ok(Some(collected.to_bytes())),
            Ok(Err(error)) if error.is::<LengthLimitError>() => Ok(None),
            Ok(Err(error)) => Err(UpstreamError::Failed(format!(
                "error body broke: {}",
                chain(&*error)
            ))),
        }
    }
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(lease) = this.lease.take() {
                    lease.finish(true);
                }
            }
            Poll::Ready(Some(Err(error))) => {
                // The upstream connection is not reused. A client that already has the headers
                // cannot get an error response: its connection is closed (hyper aborts it).
                if let Some(lease) = this.lease.take() {
                    if let Some(pool) = lease.pool.upgrade() {
                        pool.broken_bodies.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(error = %chain(error), "upstream response body broke mid-stream");
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        // A body the server never polled (204, HEAD, empty) still ends the exchange cleanly; a
        // body dropped half-read leaves the connection mid-response, so it is closed.
        if let Some(lease) = self.lease.take() {
            lease.finish(self.body.is_end_stream());
        }
    }
}
