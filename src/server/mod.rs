//! The client listener: accepts connections, serves HTTP/1.1 and HTTP/2 (h2c, or h2 over TLS) on
//! each, caps how many are open, closes idle ones, and drains them on shutdown. Sockets and tasks
//! only; no business logic.
//!
//! - [`accept`]: the accept loop (back-off, connection cap), shared with the admin listener.
//! - [`tls`]: the listener's TLS acceptor from `[server.tls]`.
//! - `workers`: the serving threads, one single-threaded runtime per core.
//! - `idle`: closing connections with nothing delivered and no request in progress.
//! - [`shutdown`]: the signals; [`reload`]: SIGHUP and file changes; [`fds`]: the open-files limit.

pub mod accept;
pub mod fds;
pub(crate) mod idle;
pub mod reload;
pub mod shutdown;
pub mod tls;
mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::proxy::Proxy;
use crate::upstream::BoxError;
pub use tls::TlsError;

/// Smallest HTTP/1 read buffer hyper accepts.
const MIN_H1_BUFFER: usize = 8192;

/// Pending connections the kernel holds for each listening socket.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the client listener with `SO_REUSEPORT`, so that each serving thread binds a socket of
/// its own to the same address and the kernel spreads new connections across them (one shared
/// socket would hand most connections to whichever thread happens to wake first).
///
/// An address another process listens on is refused as a plain bind would refuse it: it is
/// first bound without `SO_REUSEPORT`, so a second proxy started by mistake on the same port fails
/// with "address in use" rather than silently taking half of the first one's connections.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    drop(socket_for(addr, false)?);
    socket_for(addr, true)?.listen(LISTEN_BACKLOG)
}

fn socket_for(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpSocket> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuse_port)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Counts an open client connection for as long as it lives, whatever way its task ends.
struct ConnectionGauge(Proxy);

impl ConnectionGauge {
    fn new(proxy: &Proxy) -> Self {
        proxy.metrics().client_connected();
        Self(proxy.clone())
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.metrics().client_disconnected();
    }
}

/// The client listener's settings, built once.
pub struct Server {
    cfg: ServerConfig,
    /// HTTP/1.1 with a header-read timeout, and HTTP/2; both on tokio's timer.
    builder: auto::Builder<TokioExecutor>,
    /// With `[server.tls]`: HTTPS, ALPN `h2` and `http/1.1`.
    tls: Option<TlsAcceptor>,
}

impl Server {
    /// The server for `cfg`. Reads and checks the `[server.tls]` files, so a bad certificate or
    /// key is found before anything binds.
    pub fn new(cfg: &ServerConfig) -> Result<Self, TlsError> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's own buffer and header list limits sit above ours, so an oversized request is
        // answered with TMDB's body (431, code 47) by the proxy rather than hyper's bare 431.
        let header_room = cfg.max_header_bytes.saturating_mul(2).max(MIN_H1_BUFFER);
        builder
            .http1()
            .timer(TokioTimer::new())
            .max_buf_size(header_room)
            .header_read_timeout(cfg.header_read_timeout);
        // HTTP/2 gets no keep-alive pings: a peer that is gone, or idle, is closed by the idle
        // timeout instead (pings would count as activity and keep idle connections open).
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams.get())
            .max_header_list_size(u32::try_from(header_room).unwrap_or(u32::MAX));
        let tls = cfg.tls.as_ref().map(tls::acceptor).transpose()?;
        Ok(Self {
            cfg: cfg.clone(),
            builder,
            tls,
        })
    }

    /// Serves `proxy` on `listener` until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish for up to `shutdown_timeout`, and returns.
    ///
    /// Clients are served by `server.workers` threads started here (see [`workers`]), each on a
    /// single-threaded runtime of its own, so a request never moves between threads; the
    /// connection cap is shared. The calling thread keeps the admin listener and the background
    /// tasks, which so never queue behind client traffic. If no serving thread can start, it
    /// serves the clients itself.
    pub async fn run(
        self,
        listener: TcpListener,
        proxy: Proxy,
        shutdown: impl Future<Output = ()>,
    ) {
        let grace = self.cfg.shutdown_timeout;
        let limit = usize::try_from(self.cfg.max_connections.get()).unwrap_or(usize::MAX);
        let slots = Arc::new(Semaphore::new(limit));
        let server = Arc::new(self);
        let (stop, stopped) = watch::channel(false);
        let pool = workers::Pool::start(&server, &listener, &proxy, &slots, &stopped).await;
        let stopping = async {
            shutdown.await;
            // Queued requests must be on their way by half the grace period, so each still has
            // the other half to complete; later turns are answered 429 at once. One still
            // waiting for the upstream when a tenth of the grace is left is answered 504 then,
            // not cut off.
            let now = tokio::time::Instant::now();
            proxy.begin_drain(now + grace / 2, now + grace - grace / 10);
            let _ = stop.send(true);
            tracing::info!(?grace, "stopped accepting; draining connections");
        };
        let drained = if !pool.holds_listener() {
            server
                .serve_listener(listener, proxy.clone(), slots, stopping)
                .await
        } else {
            // The serving threads hold the socket now.
            drop(listener);
            stopping.await;
            true
        };
        if pool.finish(drained).await {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!("shutdown grace period elapsed; closing remaining connections");
        }
    }

    /// Accepts on `listener` and serves what it accepts, on this thread's runtime, until `stop`
    /// completes; then lets those connections finish for up to `shutdown_timeout`. Returns
    /// whether they all did.
    async fn serve_listener(
        self: Arc<Self>,
        listener: TcpListener,
        proxy: Proxy,
        slots: Arc<Semaphore>,
        stop: impl Future<Output = ()>,
    ) -> bool {
        let graceful = GracefulShutdown::new();
        // Tells connections still in their TLS handshake to give up.
        let (stopping, _) = watch::channel(false);
        accept::accept_until(
            &listener,
            "client",
            Some(slots),
            stop,
            |stream, peer, permit| {
                let _ = stream.set_nodelay(true);
                tokio::spawn(self.clone().connection(
                    stream,
                    peer,
                    proxy.clone(),
                    graceful.watcher(),
                    stopping.subscribe(),
                    permit,
                ));
            },
        )
        .await;
        drop(listener);
        let _ = stopping.send(true);
        tokio::select! {
            () = graceful.shutdown() => true,
            () = tokio::time::sleep(self.cfg.shutdown_timeout) => false,
        }
    }

    /// One client connection, from accept to close: the TLS handshake if any (bounded like a
    /// header read, so a slow client holds only its own task, and abandoned on shutdown), then
    /// HTTP.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        proxy: Proxy,
        watcher: Watcher,
        mut stopping: watch::Receiver<bool>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let _slot = permit;
        let _counted = ConnectionGauge::new(&proxy);
        let served = match &self.tls {
            None => self.serve(stream, peer, proxy, Some(watcher)).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.cfg.header_read_timeout, acceptor.accept(stream));
                let stream = tokio::select! {
                    result = handshake => match result {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    },
                    _ = stopping.wait_for(|stop| *stop) => {
                        tracing::debug!(%peer, "shutting down during the TLS handshake");
                        return;
                    }
                };
                self.serve(stream, peer, proxy, Some(watcher)).await
            }
        };
        if let Err(error) = served {
            tracing::debug!(%peer, %error, "client connection ended with an error");
        }
    }

    /// Serves HTTP on one connection, plain or TLS: HTTP/1.1 or HTTP/2 as the client speaks, over
    /// IO that ends the connection once idle, watched for graceful shutdown (when a `watcher` is
    /// given). A request counts as in progress while the proxy works on it or waits for the
    /// upstream; a response waiting for the client to read is not, so a client that stops reading
    /// is closed one idle timeout later (see `idle`).
    async fn serve<IO>(
        &self,
        io: IO,
        peer: SocketAddr,
        proxy: Proxy,
        watcher: Option<Watcher>,
    ) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let in_flight = idle::InFlight::default();
        let requests = in_flight.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let busy = requests.enter();
            async move {
                let response = proxy.handle(req, peer).await;
                Ok::<_, Infallible>(response.map(|body| idle::Tracked::new(body, busy)))
            }
        });
        let io = idle::IdleTimeout::new(io, self.cfg.idle_timeout, in_flight);
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        match watcher {
            Some(watcher) => watcher.watch(conn.into_owned()).await,
            None => conn.await,
        }
    }

    /// Serves one client connection over `io` (any byte stream, e.g. an in-memory pipe in a test
    /// on paused time) until it closes, as an accepted connection is served, without a shutdown.
    pub async fn serve_io<IO>(&self, io: IO, peer: SocketAddr, proxy: Proxy) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(io, peer, proxy, None).await
    }
}
