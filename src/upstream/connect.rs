//! How the pool opens a connection: TCP (and rustls with the ring provider for `https`) to the
//! configured base URL; or, for tests, an in-memory pipe to an in-process upstream.
//!
//! The in-memory path exists for tests on paused tokio time. Bytes on a real socket are only
//! seen when the runtime polls for I/O, and a paused runtime with nothing else to run advances
//! its clock to the next timer at that moment, so every round trip would move time on. A pipe
//! wakes its reader directly, and time moves only when every task waits on a timer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use super::{BuildError, UpstreamError, chain};
use crate::config::UpstreamConfig;

/// Opens an in-memory connection to an in-process upstream (see `sim::Sim::dialer`); the future
/// stands for the connect and handshake, which may take time.
pub type Dialer =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Box<dyn MemoryIo>> + Send>> + Send + Sync>;

/// The byte stream of an in-memory connection: a pipe, or one wrapped to count its lifetime.
pub trait MemoryIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> MemoryIo for T {}

/// A connection's byte stream, whichever way it was opened.
pub(super) trait Io: hyper::rt::Read + hyper::rt::Write + Send + Unpin {}

impl<T: hyper::rt::Read + hyper::rt::Write + Send + Unpin> Io for T {}

/// Opens upstream connections.
#[derive(Clone)]
pub(super) enum Connector {
    Network(HttpsConnector<HttpConnector>),
    Memory(Dialer),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Network(_) => f.write_str("Connector::Network"),
            Self::Memory(_) => f.write_str("Connector::Memory"),
        }
    }
}

impl Connector {
    /// TCP with `connect_timeout`, then TLS for `https`, trusting the webpki roots, the system's
    /// roots and `ca_file`.
    pub(super) fn network(cfg: &UpstreamConfig) -> Result<Self, BuildError> {
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
        Ok(Self::Network(https))
    }

    /// A new connection to `target` (the upstream's scheme and authority).
    pub(super) async fn open(&self, target: &Uri) -> Result<Box<dyn Io>, UpstreamError> {
        match self {
            Self::Network(connector) => {
                let mut connector = connector.clone();
                std::future::poll_fn(|cx| connector.poll_ready(cx))
                    .await
                    .map_err(|e| UpstreamError::Failed(chain(&*e)))?;
                let io = connector
                    .call(target.clone())
                    .await
                    .map_err(|e| UpstreamError::Failed(chain(&*e)))?;
                Ok(Box::new(io))
            }
            Self::Memory(dial) => Ok(Box::new(TokioIo::new(dial().await))),
        }
    }
}

/// rustls with the ring provider, trusting webpki roots, the system's roots, and `ca_file`.
fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, BuildError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(system_roots = added, "loaded trust roots");
    if let Some(ca) = &cfg.ca {
        let ca_error = |message: String| BuildError::CaFile {
            path: ca.path.display().to_string(),
            message,
        };
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(ca.text().as_bytes()) {
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
