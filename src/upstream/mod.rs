//! The upstream side: a pool of keep-alive HTTP/1.1 connections to the configured base URL, over
//! rustls (ring provider) when it is `https`.
//!
//! This is the only module that opens upstream connections or builds the upstream's TLS
//! configuration. It knows nothing about limits or TMDB. The admission step takes a request's
//! rate token first, then a ready connection here ([`Upstream::checkout`]), then confirms the
//! token and sends ([`Upstream::send`]), so a token counts from the moment its request leaves.

mod connect;
mod pool;
mod slots;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::combinators::BoxBody;
use tokio::time::Instant;

use connect::Connector;
pub use connect::{Dialer, MemoryIo};
pub use pool::{Connections, Lease, LeasedBody, Sent};
use pool::{Pool, chain};
pub use slots::{Busy, Standing, Tenant, WAITING_PER_CONNECTION};

use crate::config::UpstreamConfig;

/// The error type bodies are boxed into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way upstream (the client's body, streamed).
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// The upstream client could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("upstream.ca_file `{path}`: {message}")]
    CaFile { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The shared budget could not be set up (a Redis URL redis-rs refuses).
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Sending a request upstream failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No response headers within `request_timeout`.
    #[error("upstream sent no response headers within {0:?}")]
    Timeout(Duration),
    /// TCP connect plus TLS handshake exceeded `connect_timeout`.
    #[error("connecting to the upstream timed out")]
    ConnectTimeout,
    /// An error body did not arrive within `request_timeout`.
    #[error("upstream error body did not arrive in time")]
    BodyTimeout,
    /// Refused, unresolvable, TLS failure, reset, or a reply that is not HTTP.
    #[error("upstream request failed: {0}")]
    Failed(String),
    /// No connection for this request in time: the pool's waiting room is full.
    #[error("no upstream connection free: {0:?}")]
    Busy(Busy),
}

impl From<Busy> for UpstreamError {
    fn from(busy: Busy) -> Self {
        Self::Busy(busy)
    }
}

impl UpstreamError {
    fn from_hyper(error: &hyper::Error) -> Self {
        Self::Failed(chain(error))
    }
}

/// The upstream: where requests go and the pool they go through.
#[derive(Debug, Clone)]
pub struct Upstream {
    pool: Pool,
    base: Uri,
    request_timeout: Duration,
}

// === impl Upstream ===

impl Upstream {
    /// The client for `cfg`, over the network. `broken_bodies` counts response bodies that break
    /// mid-stream. Must run inside a tokio runtime.
    pub fn new(cfg: &UpstreamConfig, broken_bodies: Arc<AtomicU64>) -> Result<Self, BuildError> {
        Ok(Self::with_connector(
            cfg,
            Connector::network(cfg)?,
            broken_bodies,
        ))
    }

    /// The client for `cfg`, reaching the upstream through `dial` instead of the network (tests
    /// on paused time, against the in-process stand-in).
    pub fn in_memory(cfg: &UpstreamConfig, dial: Dialer, broken_bodies: Arc<AtomicU64>) -> Self {
        Self::with_connector(cfg, Connector::Memory(dial), broken_bodies)
    }

    fn with_connector(
        cfg: &UpstreamConfig,
        connector: Connector,
        broken_bodies: Arc<AtomicU64>,
    ) -> Self {
        let max = usize::try_from(cfg.max_connections.get()).unwrap_or(usize::MAX);
        Self {
            pool: Pool::new(
                connector,
                cfg.base_url.clone(),
                max,
                cfg.connect_timeout,
                cfg.idle_timeout,
                broken_bodies,
            ),
            base: cfg.base_url.clone(),
            request_timeout: cfg.request_timeout,
        }
    }

    /// How its connections are used now.
    pub fn connections(&self) -> Connections {
        self.pool.connections()
    }

    /// The upstream's scheme and authority.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// How long a request may wait for a connection and its response headers.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The deadline for a request's response headers, starting now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.request_timeout
    }

    /// A ready connection for a request of `tenant` (its key), waiting for a free one (or a new
    /// one) until `deadline`, in turn with the other keys waiting (known keys first).
    pub async fn checkout(
        &self,
        tenant: Tenant,
        standing: Standing,
        deadline: Instant,
    ) -> Result<Lease, UpstreamError> {
        tokio::time::timeout_at(deadline, self.pool.checkout(tenant, standing))
            .await
            .map_err(|_| UpstreamError::Timeout(self.request_timeout))?
    }

    /// Sends `req` on `lease` and waits for the response headers until `deadline`; the body
    /// follows, and releases the connection when it ends. A stale pooled connection is replaced
    /// and the request handed back unsent ([`Sent::Stale`]).
    pub async fn send(
        &self,
        lease: Lease,
        req: Request<UpstreamBody>,
        deadline: Instant,
    ) -> Result<Sent, UpstreamError> {
        tokio::time::timeout_at(deadline, lease.send(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.request_timeout))?
    }
}
