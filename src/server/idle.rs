//! Closing client connections that sit idle.
//!
//! hyper has no keep-alive idle timeout for HTTP/1 (only a header-read timeout) and none for
//! HTTP/2, so an idle client would hold one of the `server.max_connections` slots forever. The
//! connection's IO is wrapped, and once the connection has had no activity and no request in
//! progress for `server.idle_timeout`, the next read reports end-of-stream, which hyper treats as
//! the client closing.
//!
//! What counts, and why:
//! - A request is in progress while its handler runs and while its response body waits for the
//!   upstream. A response waiting for the *client* (a full socket buffer, an HTTP/2 window the
//!   client keeps shut) is not: a client that stops reading is idle, and one steadily reading
//!   keeps the connection active by the bytes it takes.
//! - Over HTTP/1, every byte read or written is activity.
//! - Over HTTP/2, only what the server writes of a stream (HEADERS, CONTINUATION and DATA frames)
//!   is: PINGs, SETTINGS and WINDOW_UPDATEs are how a client would keep a connection open at no
//!   cost, and each request it sends is answered with HEADERS anyway.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the requests of one connection tell its idle check: how many are in progress, and when a
/// response was last ready.
#[derive(Debug, Clone)]
pub(crate) struct InFlight(Arc<Requests>);

#[derive(Debug)]
struct Requests {
    in_progress: AtomicUsize,
    /// When a response or a body frame was last ready, in nanoseconds since `origin`.
    ready: AtomicU64,
    origin: Instant,
}

impl Default for InFlight {
    fn default() -> Self {
        Self(Arc::new(Requests {
            in_progress: AtomicUsize::new(0),
            ready: AtomicU64::new(0),
            origin: Instant::now(),
        }))
    }
}

impl InFlight {
    /// Marks a request as in progress until the returned guard is dropped.
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.in_progress.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }

    fn is_idle(&self) -> bool {
        self.0.in_progress.load(Ordering::Relaxed) == 0
    }

    /// Something is ready to go to the client: the connection is active from now on.
    fn ready_now(&self) {
        let nanos = u64::try_from(self.0.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.ready.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last_ready(&self) -> Instant {
        self.0.origin + Duration::from_nanos(self.0.ready.load(Ordering::Relaxed))
    }
}

/// Ends a request's in-progress mark when dropped.
pub(crate) struct InFlightGuard(InFlight);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.0.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in progress while it waits for the upstream, and
/// leaves it idle while the client is the one to move.
pub(crate) struct Tracked<B> {
    body: B,
    requests: InFlight,
    /// Held while the last poll found no frame ready.
    waiting: Option<InFlightGuard>,
}

impl<B> Tracked<B> {
    /// The body of a response that is ready now; `handling` marked its handler as in progress.
    pub(crate) fn new(body: B, handling: InFlightGuard) -> Self {
        let requests = handling.0.clone();
        // Ready first, then out of progress: the idle check never sees a gap between the two.
        requests.ready_now();
        drop(handling);
        Self {
            body,
            requests,
            waiting: None,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            if this.waiting.is_none() {
                this.waiting = Some(this.requests.enter());
            }
        } else if let Some(waited) = this.waiting.take() {
            this.requests.ready_now();
            drop(waited);
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

/// Which protocol the client speaks, learnt from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// This many bytes of the HTTP/2 connection preface seen so far.
    Unknown(usize),
    Http1,
    Http2,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Protocol {
    fn learn(self, read: &[u8]) -> Self {
        let Self::Unknown(seen) = self else {
            return self;
        };
        let rest = &H2_PREFACE[seen..];
        let n = rest.len().min(read.len());
        if read[..n] != rest[..n] {
            Self::Http1
        } else if seen + n == H2_PREFACE.len() {
            Self::Http2
        } else {
            Self::Unknown(seen + n)
        }
    }
}

/// Follows the HTTP/2 frames the server writes, to tell a stream's frames from the connection's.
#[derive(Debug, Default)]
struct Frames {
    header: [u8; 9],
    /// Bytes of the current frame header seen so far.
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
}

impl Frames {
    /// Follows `written`; true if a HEADERS, CONTINUATION or DATA frame began in it.
    fn stream_frame_in(&mut self, mut written: &[u8]) -> bool {
        const DATA: u8 = 0x0;
        const HEADERS: u8 = 0x1;
        const CONTINUATION: u8 = 0x9;
        let mut found = false;
        while !written.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(written.len());
                self.skip -= n;
                written = &written[n..];
                continue;
            }
            let n = (self.header.len() - self.have).min(written.len());
            self.header[self.have..self.have + n].copy_from_slice(&written[..n]);
            self.have += n;
            written = &written[n..];
            if self.have == self.header.len() {
                let [a, b, c, kind, ..] = self.header;
                self.skip = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.have = 0;
                found |= matches!(kind, DATA | HEADERS | CONTINUATION);
            }
        }
        found
    }
}

/// IO that reports end-of-stream once idle for `timeout`.
pub(crate) struct IdleTimeout<IO> {
    io: IO,
    timeout: Duration,
    in_flight: InFlight,
    /// Last read or write that counted as activity.
    last_activity: Instant,
    protocol: Protocol,
    /// What has been written, followed frame by frame once the client spoke HTTP/2.
    frames: Frames,
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
            protocol: Protocol::Unknown(0),
            frames: Frames::default(),
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    /// Counts `read` as activity unless the client speaks HTTP/2: what it sends there is either
    /// a request (answered with HEADERS, which count) or connection upkeep (which does not).
    fn on_read(&mut self, read: &[u8]) {
        self.protocol = self.protocol.learn(read);
        if self.protocol != Protocol::Http2 {
            self.touch();
        }
    }

    /// Counts `written` as activity, over HTTP/2 only if it carries a stream's frames.
    fn on_write<'a>(&mut self, written: impl IntoIterator<Item = &'a [u8]>) {
        let mut active = self.protocol != Protocol::Http2;
        if !active {
            for bytes in written {
                active |= self.frames.stream_frame_in(bytes);
            }
        }
        if active {
            self.touch();
        }
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
                    self.on_read(&buf.filled()[before..]);
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                while self.deadline.as_mut().poll(cx).is_ready() {
                    let idle_until =
                        self.last_activity.max(self.in_flight.last_ready()) + self.timeout;
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
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.on_write([&buf[..n]]);
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
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            // The first `n` bytes across the slices went out.
            self.on_write(bufs.iter().scan(n, |left, slice| {
                let take = (*left).min(slice.len());
                *left -= take;
                (take > 0 || *left > 0).then(|| &slice[..take])
            }));
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len().to_be_bytes();
        let mut out = vec![len[5], len[6], len[7], kind, 0, 0, 0, 0, 1];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn stream_frames_are_told_from_upkeep_however_the_writes_split_them() {
        const PING_ACK: u8 = 0x6;
        const SETTINGS: u8 = 0x4;
        let upkeep = [frame(SETTINGS, &[]), frame(PING_ACK, &[0xAB; 8])].concat();
        // A DATA payload made of bytes that would read as a HEADERS frame header if misaligned.
        let data = frame(0x0, &[0x01; 20]);
        for split in 1..upkeep.len() {
            let mut frames = Frames::default();
            assert!(!frames.stream_frame_in(&upkeep[..split]));
            assert!(!frames.stream_frame_in(&upkeep[split..]));
            assert_eq!((frames.have, frames.skip), (0, 0));
        }
        for split in 0..data.len() {
            let mut frames = Frames::default();
            let first = frames.stream_frame_in(&data[..split]);
            let second = frames.stream_frame_in(&data[split..]);
            assert_eq!((first, second), (split >= 9, split < 9), "split at {split}");
            assert!(!frames.stream_frame_in(&upkeep), "after a split at {split}");
        }
    }

    #[test]
    fn the_protocol_is_known_from_the_preface_in_any_number_of_reads() {
        let mut protocol = Protocol::Unknown(0);
        for byte in H2_PREFACE {
            assert_ne!(protocol, Protocol::Http1);
            protocol = protocol.learn(std::slice::from_ref(byte));
        }
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(protocol.learn(b"GET / HTTP/1.1"), Protocol::Http2);
        assert_eq!(
            Protocol::Unknown(0).learn(b"PRI * HTTP/1.1\r\n"),
            Protocol::Http1
        );
        assert_eq!(Protocol::Unknown(0).learn(b"GET"), Protocol::Http1);
        assert_eq!(Protocol::Unknown(0).learn(b"PR"), Protocol::Unknown(2));
    }
}
