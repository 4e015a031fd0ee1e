//! The response body type, and how an upstream body reaches the client without pinning the
//! upstream connection it came on.
//!
//! A client reads at its own pace (an HTTP/2 client can announce a zero window and never read),
//! but the connection its answer arrives on is one of `upstream.max_connections`. So the upstream
//! body is read as fast as the upstream sends it, into memory, up to `upstream.max_buffered_body`,
//! and the connection goes back to the pool the moment the upstream is done, whatever the client
//! does:
//! - a body of at most [`INLINE_BODY`] (most TMDB answers, whether their length is declared or they
//!   are chunked) is read whole before the headers are passed on, in the request's own task;
//! - a longer one is read by a task of its own (the pump) while the client drains it (a chunked
//!   one once its first [`INLINE_BODY`] are in).
//!
//! A body larger than the buffer holds its connection while the client reads. If the buffer stays
//! full and the client takes less than `upstream.min_delivery_rate` bytes per second over
//! [`RATE_WINDOW`], the upstream connection is closed and the client's response ends (its
//! connection is closed, as for an upstream body broken mid-stream). An upstream that sends no
//! body bytes for `upstream.request_timeout` is treated the same way.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::upstream::{BoxError, LeasedBody, UpstreamError};

/// Bodies declaring at most this many bytes are read whole before the answer is passed on: 256 KiB.
pub const INLINE_BODY: u64 = 256 * 1024;

/// How long the buffer may stay full before the client's pace is judged: 5 s.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// How an upstream body is held for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Most bytes held in memory for one response.
    pub max_buffered: usize,
    /// Slowest the client may read while the buffer is full, bytes per second.
    pub min_rate: u64,
    /// Longest the upstream may go without sending body bytes.
    pub frame_timeout: Duration,
}

/// A client response body.
#[derive(Debug)]
pub enum ProxyBody {
    /// A body held whole: written by the proxy, or read from the upstream before the headers
    /// were passed on. `None` once sent.
    Full(Option<Bytes>),
    /// An upstream body the pump is reading into memory while the client drains it.
    Pumped(Pumped),
    /// A body read into the cache by a task of its own, handed on piece by piece (see [`tee`]).
    Teed(Teed),
}

impl ProxyBody {
    /// A complete body.
    pub fn full(bytes: Bytes) -> Self {
        Self::Full(Some(bytes))
    }
}

/// Reads `body` for its client as the module doc says. An error means the upstream failed before
/// anything was passed on, so the client can still get a TMDB answer.
pub async fn deliver(
    mut body: LeasedBody,
    delivery: Delivery,
    deadline: Instant,
) -> Result<ProxyBody, UpstreamError> {
    let hint = body.size_hint();
    match hint.exact() {
        Some(length) if length <= INLINE_BODY => {
            let limit = usize::try_from(length).unwrap_or(usize::MAX);
            return match body.read_bounded(limit, deadline).await? {
                Some(bytes) => Ok(ProxyBody::full(bytes)),
                None => Err(UpstreamError::Failed(
                    "body longer than its Content-Length".into(),
                )),
            };
        }
        Some(_) => return Ok(pumped(body, Vec::new(), hint, delivery)),
        None => {}
    }
    // No declared length (chunked, as TMDB's compressed answers often are): read up to the
    // inline size, and stream only what is longer.
    let mut prefix = Vec::new();
    let mut read = 0;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(UpstreamError::BodyTimeout),
            Ok(None) => return Ok(ProxyBody::full(concat(prefix, read))),
            Ok(Some(Err(error))) => {
                return Err(UpstreamError::Failed(format!(
                    "upstream body broke: {error}"
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            read += data.len();
            prefix.push(data);
            if read as u64 > INLINE_BODY {
                return Ok(pumped(body, prefix, hint, delivery));
            }
        }
    }
}

/// The chunks of a body read whole, as one.
fn concat(chunks: Vec<Bytes>, len: usize) -> Bytes {
    match <[Bytes; 1]>::try_from(chunks) {
        Ok([only]) => only,
        Err(chunks) => {
            let mut all = Vec::with_capacity(len);
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            Bytes::from(all)
        }
    }
}

/// The client side of a body the pump goes on reading, `prefix` already in hand.
fn pumped(body: LeasedBody, prefix: Vec<Bytes>, hint: SizeHint, delivery: Delivery) -> ProxyBody {
    let (tx, rx) = mpsc::unbounded_channel();
    let space = Arc::new(Semaphore::new(delivery.max_buffered));
    let delivered = Arc::new(AtomicU64::new(0));
    tokio::spawn(pump(
        body,
        prefix,
        tx,
        space.clone(),
        delivered.clone(),
        delivery,
    ));
    ProxyBody::Pumped(Pumped {
        rx,
        space,
        delivered,
        max_chunk: delivery.max_buffered,
        hint,
        done: false,
    })
}

/// Reads `body` into the buffer as fast as the upstream sends it, while there is room. Ends, and
/// with it the upstream exchange, when the body ends, breaks, stalls, or its client is gone or
/// too slow.
async fn pump(
    mut body: LeasedBody,
    prefix: Vec<Bytes>,
    tx: mpsc::UnboundedSender<Result<Bytes, BoxError>>,
    space: Arc<Semaphore>,
    delivered: Arc<AtomicU64>,
    delivery: Delivery,
) {
    let mut judged_at = 0;
    let mut prefix = prefix.into_iter();
    loop {
        if let Some(data) = prefix.next() {
            if !hold(&space, &delivered, &mut judged_at, delivery, data.len()).await {
                let _ = tx.send(Err("client read too slowly".into()));
                return;
            }
            if tx.send(Ok(data)).is_err() {
                return;
            }
            continue;
        }
        let frame = match tokio::time::timeout(delivery.frame_timeout, body.frame()).await {
            // The body ended: dropping it hands the connection back to the pool.
            Ok(None) => return,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(error))) => {
                let _ = tx.send(Err(error.into()));
                return;
            }
            Err(_) => {
                tracing::warn!(timeout = ?delivery.frame_timeout, "upstream body stalled; closing its connection");
                let _ = tx.send(Err("upstream body stalled".into()));
                return;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if !hold(&space, &delivered, &mut judged_at, delivery, data.len()).await {
            let _ = tx.send(Err("client read too slowly".into()));
            return;
        }
        if tx.send(Ok(data)).is_err() {
            return;
        }
    }
}

/// Waits for room for `len` more bytes in the buffer. `false`: the client is gone, or it took
/// less than `min_rate` over a [`RATE_WINDOW`] in which the buffer stayed full.
async fn hold(
    space: &Semaphore,
    delivered: &AtomicU64,
    judged_at: &mut u64,
    delivery: Delivery,
    len: usize,
) -> bool {
    let room = u32::try_from(len.min(delivery.max_buffered)).unwrap_or(u32::MAX);
    loop {
        match tokio::time::timeout(RATE_WINDOW, space.acquire_many(room)).await {
            Ok(Ok(permit)) => {
                permit.forget();
                return true;
            }
            // The client is gone (its body dropped): the exchange ends half-read, and its
            // connection is closed rather than reused.
            Ok(Err(_)) => return false,
            Err(_) => {
                let now = delivered.load(Ordering::Relaxed);
                let floor = delivery.min_rate.saturating_mul(RATE_WINDOW.as_secs());
                if now - *judged_at < floor {
                    tracing::warn!(
                        delivered_bytes = now - *judged_at,
                        window = ?RATE_WINDOW,
                        "client reads a large body too slowly; closing its upstream connection"
                    );
                    return false;
                }
                *judged_at = now;
            }
        }
    }
}

/// How a teed body ended, for the cache.
#[derive(Debug)]
pub enum TeeEnd {
    /// Read whole: every byte, as the client got them.
    Whole(Bytes),
    /// Longer than the limit: the client got the rest directly, nothing was kept.
    TooLarge,
    /// The upstream body broke; the client's response ended with the error.
    Broken(String),
}

/// A piece of a teed body for its client.
#[derive(Debug)]
enum Piece {
    Data(Bytes),
    /// The rest of the body, read by the client itself (the body outgrew the limit).
    Rest(ProxyBody),
    Broken(BoxError),
}

/// The client side of a teed body.
#[derive(Debug)]
pub struct Teed {
    rx: mpsc::UnboundedReceiver<Piece>,
    rest: Option<Box<ProxyBody>>,
    hint: SizeHint,
    done: bool,
}

/// Reads `body` in a task of its own, keeping up to `limit` bytes for the cache while its client
/// gets each piece as it arrives. The reading goes on if the client goes away, so a fill shared
/// by others ends whatever its first client does; what the client has not taken yet is bounded
/// by `limit` (past it, the client reads the rest itself, at its own pace, with the pump's
/// guards).
pub fn tee(
    mut body: ProxyBody,
    limit: usize,
) -> (ProxyBody, tokio::sync::oneshot::Receiver<TeeEnd>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (end_tx, end) = tokio::sync::oneshot::channel();
    let hint = body.size_hint();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut read = 0;
        let outcome = loop {
            match body.frame().await {
                None => break TeeEnd::Whole(concat(kept, read)),
                Some(Err(error)) => {
                    let reason = format!("the upstream body broke: {error}");
                    let _ = tx.send(Piece::Broken(error));
                    break TeeEnd::Broken(reason);
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    read += data.len();
                    if read > limit {
                        drop(kept);
                        let _ = tx.send(Piece::Data(data));
                        let _ = tx.send(Piece::Rest(body));
                        break TeeEnd::TooLarge;
                    }
                    kept.push(data.clone());
                    // A client that went away leaves the reading to go on.
                    let _ = tx.send(Piece::Data(data));
                }
            }
        };
        let _ = end_tx.send(outcome);
    });
    let client = ProxyBody::Teed(Teed {
        rx,
        rest: None,
        hint,
        done: false,
    });
    (client, end)
}

/// The client side of a pumped body.
#[derive(Debug)]
pub struct Pumped {
    rx: mpsc::UnboundedReceiver<Result<Bytes, BoxError>>,
    /// Free bytes of the buffer; each chunk taken gives its bytes back.
    space: Arc<Semaphore>,
    /// Bytes the client has taken, for the pump's judgement of its pace.
    delivered: Arc<AtomicU64>,
    max_chunk: usize,
    hint: SizeHint,
    done: bool,
}

impl Drop for Pumped {
    fn drop(&mut self) {
        // Wakes a pump waiting for room, so it ends the exchange.
        self.space.close();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Teed(teed) => loop {
                if let Some(rest) = teed.rest.as_mut() {
                    return Pin::new(rest.as_mut()).poll_frame(cx);
                }
                return match teed.rx.poll_recv(cx) {
                    Poll::Ready(Some(Piece::Data(data))) => {
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Piece::Rest(rest))) => {
                        teed.rest = Some(Box::new(rest));
                        continue;
                    }
                    Poll::Ready(Some(Piece::Broken(error))) => Poll::Ready(Some(Err(error))),
                    Poll::Ready(None) => {
                        teed.done = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                };
            },
            Self::Pumped(pumped) => match pumped.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    pumped.space.add_permits(data.len().min(pumped.max_chunk));
                    pumped
                        .delivered
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => {
                    pumped.done = true;
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Pumped(pumped) => pumped.done,
            Self::Teed(teed) => teed.rest.as_ref().map_or(teed.done, |r| r.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Pumped(pumped) => pumped.hint,
            // What is still to come is unknown once pieces have gone.
            Self::Teed(teed) => teed.hint,
        }
    }
}
