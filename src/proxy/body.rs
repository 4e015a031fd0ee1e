//! The response body type: either bytes the proxy wrote itself or the upstream's body, streamed.
//!
//! An enum rather than a boxed trait object, so neither path allocates for the body wrapper.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::upstream::LeasedBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A client response body.
#[derive(Debug)]
pub enum ProxyBody {
    /// A body the proxy wrote (a TMDB status body); `None` once sent.
    Full(Option<Bytes>),
    /// The upstream's body, passed through frame by frame.
    Upstream(LeasedBody),
}

impl ProxyBody {
    /// A complete body.
    pub fn full(bytes: Bytes) -> Self {
        Self::Full(Some(bytes))
    }
}

impl From<LeasedBody> for ProxyBody {
    fn from(body: LeasedBody) -> Self {
        Self::Upstream(body)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Upstream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Upstream(body) => body.size_hint(),
        }
    }
}
