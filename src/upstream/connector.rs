//! A connector that caps how many upstream connections exist at once.
//!
//! hyper-util's pool has no cap of its own: it opens a new connection whenever no idle one is
//! ready. TMDB's edge tolerates about 20 connections per client IP, so each connection here holds a
//! semaphore permit for its whole life (idle time in the pool included) and a new connection waits
//! for a permit. The connect timeout covers TCP and TLS, not the wait for a permit, which is
//! bounded by the request timeout instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::BoxError;

/// Connecting took longer than `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("connecting to the upstream timed out")]
pub struct ConnectTimedOut;

/// Wraps a connector so at most `permits` connections are open.
#[derive(Debug, Clone)]
pub(super) struct CappedConnector<C> {
    inner: C,
    permits: Arc<Semaphore>,
    connect_timeout: Duration,
}

impl<C> CappedConnector<C> {
    pub(super) fn new(inner: C, max_connections: usize, connect_timeout: Duration) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            connect_timeout,
        }
    }
}

impl<C> Service<Uri> for CappedConnector<C>
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Response: Send,
    C::Future: Send,
    C::Error: Into<BoxError>,
{
    type Response = Capped<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is awaited inside the future, after a permit is held.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let permits = self.permits.clone();
        let connect_timeout = self.connect_timeout;
        Box::pin(async move {
            let permit = permits.acquire_owned().await?;
            let connect = async {
                std::future::poll_fn(|cx| inner.poll_ready(cx))
                    .await
                    .map_err(Into::into)?;
                inner.call(dst).await.map_err(Into::into)
            };
            let io = tokio::time::timeout(connect_timeout, connect)
                .await
                .map_err(|_| Box::new(ConnectTimedOut) as BoxError)??;
            Ok(Capped {
                io,
                _permit: permit,
            })
        })
    }
}

/// A connection that gives its permit back when it closes.
#[derive(Debug)]
pub(super) struct Capped<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: Connection> Connection for Capped<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: Read + Unpin> Read for Capped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Capped<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
