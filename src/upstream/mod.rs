//! The upstream side: a pool of keep-alive HTTP/1.1 connections to the configured base URL, over
//! rustls (ring provider) when it is `https`.
//!
//! This is the only module that opens upstream connections or builds a TLS configuration. It knows
//! nothing about limits or TMDB. The proxy first takes a ready connection ([`Upstream::checkout`]),
//! then its rate token, then sends ([`Upstream::send`]), so a token is spent at the moment the
//! request leaves.

mod pool;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::time::Instant;

pub use pool::{Lease, LeasedBody};
use pool::{Pool, chain};

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
    /// Builds the client. Must run inside a tokio runtime.
    /// Builds the client. `broken_bodies` counts response bodies that break mid-stream.
    pub fn new(cfg: &UpstreamConfig, broken_bodies: Arc<AtomicU64>) -> Result<Self, BuildError> {
        let tls = tls_config(cfg)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let max = usize::try_from(cfg.max_connections.get()).unwrap_or(usize::MAX);
        Ok(Self {
            pool: Pool::new(
                https,
                cfg.base_url.clone(),
                max,
                cfg.connect_timeout,
                cfg.idle_timeout,
                broken_bodies,
            ),
            base: cfg.base_url.clone(),
            request_timeout: cfg.request_timeout,
        })
    }

    /// The upstream's scheme and authority.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// The deadline for a request's response headers, starting now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.request_timeout
    }

    /// A ready connection, waiting for a free one (or a new one) until `deadline`.
    pub async fn checkout(&self, deadline: Instant) -> Result<Lease, UpstreamError> {
        tokio::time::timeout_at(deadline, self.pool.checkout())
            .await
            .map_err(|_| UpstreamError::Timeout(self.request_timeout))?
    }

    /// Sends `req` (whose URI already points at [`Upstream::base`]) on `lease` and waits for the
    /// response headers until `deadline`; the body streams afterwards and releases the connection
    /// when it ends.
    pub async fn send(
        &self,
        lease: Lease,
        req: Request<UpstreamBody>,
        deadline: Instant,
    ) -> Result<Response<LeasedBody>, UpstreamError> {
        tokio::time::timeout_at(deadline, lease.send(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.request_timeout))?
    }
}

/// rustls with the ring provider, trusting webpki roots, the system's roots, and `ca_file`.
fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, BuildError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(system_roots = added, "loaded trust roots");
    if let Some(path) = &cfg.ca_file {
        let ca_error = |message: String| BuildError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let mut count = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))? {
            let cert = cert.map_err(|e| ca_error(e.to_string()))?;
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            count += 1;
        }
        if count == 0 {
            return Err(ca_error("holds no PEM certificate".to_owned()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
