//! TLS on the client listener: the PEM text of `[server.tls]` (read by `config`) turned into a
//! rustls acceptor (ring provider, ALPN `h2` and `http/1.1`).
//!
//! Built once when the server is built, before it binds, so a bad certificate or key stops the
//! proxy at start (exit 64) with the key to fix, like any other configuration error.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The certificate or key cannot serve TLS. The message names the configuration key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid config: `server.tls.cert_file`: `{path}`: {message}")]
    Cert { path: String, message: String },
    #[error("invalid config: `server.tls.key_file`: `{path}`: {message}")]
    Key { path: String, message: String },
    #[error(
        "invalid config: `server.tls`: the certificate and key do not make a usable TLS configuration: {0}"
    )]
    Config(#[from] rustls::Error),
}

/// The acceptor for `cfg`'s certificate chain and key.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let cert_error = |message: String| TlsError::Cert {
        path: cfg.cert.path.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cfg.cert.text().as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("holds no PEM certificate".to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(cfg.key.text().as_bytes()).map_err(|e| TlsError::Key {
            path: cfg.key.path.display().to_string(),
            message: e.to_string(),
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
