//! The client listener: accepts connections, serves HTTP/1.1 and HTTP/2 (h2c) on each, caps how
//! many are open, and drains them on shutdown. Sockets and tasks only; no business logic.

mod idle;
pub mod reload;
pub mod shutdown;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::proxy::Proxy;

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

/// Serves `proxy` on `listener` until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish for up to `shutdown_timeout`, and returns.
pub async fn run(
    listener: TcpListener,
    proxy: Proxy,
    cfg: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    // HTTP/2 gets no keep-alive pings: a peer that is gone, or idle, is closed by the idle
    // timeout instead (pings would count as activity and keep idle connections open).
    builder.http2().timer(TokioTimer::new());
    let limit = usize::try_from(cfg.max_connections.get()).unwrap_or(usize::MAX);
    let slots = Arc::new(Semaphore::new(limit));
    let graceful = GracefulShutdown::new();
    // Tells connections still in their TLS handshake to give up.
    let (stopping, _) = tokio::sync::watch::channel(false);
    let tls = cfg
        .tls
        .as_ref()
        .map(|tls| tokio_rustls::TlsAcceptor::from(tls.server.clone()));
    tokio::pin!(shutdown);

    loop {
        // Waiting for a slot before accepting leaves excess clients in the kernel's backlog.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Per-connection errors (e.g. reset before accept, EMFILE) must not stop the
                    // server; back off briefly so a full fd table does not spin the loop.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let counted = ConnectionGauge::new(&proxy);
        let proxy = proxy.clone();
        let in_flight = idle::InFlight::default();
        let idle_timeout = cfg.idle_timeout;
        let requests = in_flight.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let busy = requests.enter();
            async move {
                let response = proxy.handle(req, peer).await;
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        });
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        let mut stopping_rx = stopping.subscribe();
        let handshake_timeout = cfg.header_read_timeout;
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    let io = idle::IdleTimeout::new(stream, idle_timeout, in_flight);
                    let conn = builder.serve_connection(TokioIo::new(io), service);
                    watcher.watch(conn.into_owned()).await
                }
                // The handshake runs in the connection's task, bounded like a header read, so a
                // slow client cannot hold up the accept loop.
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    let handshake = tokio::select! {
                        result = handshake => result,
                        _ = stopping_rx.wait_for(|stop| *stop) => {
                            tracing::debug!(%peer, "shutting down during the TLS handshake");
                            return;
                        }
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let io = idle::IdleTimeout::new(stream, idle_timeout, in_flight);
                            let conn = builder.serve_connection(TokioIo::new(io), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, error = %error, "client connection ended with an error");
            }
            drop(counted);
            drop(permit);
        });
    }

    drop(listener);
    let _ = stopping.send(true);
    // Queued requests must be on their way by half the grace period, so each still has the
    // other half to complete; later turns are answered 429 at once.
    proxy.begin_drain(tokio::time::Instant::now() + cfg.shutdown_timeout / 2);
    tracing::info!(grace = ?cfg.shutdown_timeout, "stopped accepting; draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(cfg.shutdown_timeout) => {
            tracing::warn!("shutdown grace period elapsed; closing remaining connections");
        }
    }
}
