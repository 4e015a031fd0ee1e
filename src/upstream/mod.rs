//! The upstream client: pooled keep-alive HTTP/1.1 connections to the configured base URL, over
//! rustls (ring provider) when it is `https`.
//!
//! This is the only module that builds a client or a TLS configuration. It knows nothing about
//! limits or TMDB; it sends what the proxy hands it and says how that went.

mod connector;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub use connector::ConnectTimedOut;
use connector::CappedConnector;

use crate::config::UpstreamConfig;

/// The error type bodies and connectors are boxed into.
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
    /// Refused, unresolvable, TLS failure, reset, or a reply that is not HTTP.
    #[error("upstream request failed: {0}")]
    Failed(String),
}

/// The pooled upstream client.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<CappedConnector<HttpsConnector<HttpConnector>>, UpstreamBody>,
    base: Uri,
    request_timeout: Duration,
}

// === impl Upstream ===

impl Upstream {
    /// Builds the client. Must run inside a tokio runtime.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, BuildError> {
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
        let connector = CappedConnector::new(https, max, cfg.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .pool_max_idle_per_host(max)
            .build(connector);
        Ok(Self {
            client,
            base: cfg.base_url.clone(),
            request_timeout: cfg.request_timeout,
        })
    }

    /// The upstream's scheme and authority.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Sends `req` (whose URI must already point at [`Upstream::base`]) and waits for the response
    /// headers; the body streams afterwards.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(self.request_timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(self.request_timeout)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }
}

/// Names a client error by its cause, without echoing the request URI (it may carry a key).
fn classify(error: &hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut causes = Vec::new();
    while let Some(e) = source {
        if e.is::<ConnectTimedOut>() {
            return UpstreamError::ConnectTimeout;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return UpstreamError::ConnectTimeout;
            }
        }
        causes.push(e.to_string());
        source = e.source();
    }
    causes.dedup();
    UpstreamError::Failed(causes.join(": "))
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
