//! Closing client connections that sit idle.
//!
//! hyper has no keep-alive idle timeout for HTTP/1 (only a header-read timeout) and none for
//! HTTP/2, so an idle client would hold one of the `server.max_connections` slots forever. The
//! connection's IO is wrapped: every read or write counts as activity, and once the connection has
//! had no activity and no request in progress for `server.idle_timeout`, the next read reports
//! end-of-stream, which hyper treats as the client closing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests of one connection whose handler is still running.
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Marks a request as in progress until the returned guard is dropped.
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.0.clone())
    }

    fn is_idle(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0
    }
}

/// Ends a request's in-progress mark when dropped.
pub(crate) struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request marked in progress until it ends (or is dropped).
pub(crate) struct Tracked<B> {
    body: B,
    _busy: InFlightGuard,
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, busy: InFlightGuard) -> Self {
        Self { body, _busy: busy }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// IO that reports end-of-stream once idle for `timeout`.
pub(crate) struct IdleTimeout<IO> {
    io: IO,
    timeout: Duration,
    in_flight: InFlight,
    /// Last read or write that moved bytes.
    last_activity: Instant,
    /// Checked when it fires, and moved on then: resetting a timer on every read and write
    /// would cost more than the IO.
    deadline: Pin<Box<Sleep>>,
}

impl<IO> IdleTimeout<IO> {
    pub(crate) fn new(io: IO, timeout: Duration, in_flight: InFlight) -> Self {
        Self {
            io,
            timeout,
            in_flight,
            last_activity: Instant::now(),
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for IdleTimeout<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                while self.deadline.as_mut().poll(cx).is_ready() {
                    let idle_until = self.last_activity + self.timeout;
                    let now = Instant::now();
                    if now >= idle_until && self.in_flight.is_idle() {
                        // Nothing read, nothing to answer: end the connection as if the client
                        // had closed it.
                        return Poll::Ready(Ok(()));
                    }
                    // Activity since the timer was set, or a request in progress: look again
                    // when the connection could next be idle for a whole timeout.
                    let next = if now >= idle_until {
                        now + self.timeout
                    } else {
                        idle_until
                    };
                    self.deadline.as_mut().reset(next);
                }
                Poll::Pending
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
