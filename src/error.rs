//! The proxy's error type and the one function that turns an error into a client response.
//!
//! Each layer has its own error: `config::ConfigError`, `upstream::UpstreamError` (and
//! `BuildError`), `limiter::Refusal`, `server::tls::TlsError`. A request's path collects what it
//! meets into [`ProxyError`], and only [`ProxyError::to_response`] builds an error response, so
//! every failure a client sees is a TMDB status body from the table in [`crate::tmdb::status`].
//! The headers every answer carries (rate-limit fields, `Retry-After` on a 429, CORS, request id)
//! are the proxy's exit's business, not this module's.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Response, StatusCode};

use crate::limiter::Refusal;
use crate::tmdb::ErrorBody;
use crate::tmdb::status::{self, code};
use crate::upstream::UpstreamError;

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No `api_key`, no bearer token, and no default key configured.
    #[error("request carries no API key and no default key is configured")]
    MissingKey,
    /// An app token that names no configured app, or none while `clients.require_token` is on.
    #[error("no known app token")]
    InvalidToken,
    /// Over a limit: the key's, the global one, a pause after an upstream 429, a full table, the
    /// drain; or the upstream's own 429 with a body that is not TMDB's.
    #[error("rate limited ({:?}): {} requests in the window, limit {}", .0.reason, .0.count, .0.limit)]
    RateLimited(Refusal),
    /// A method the proxy never forwards (`CONNECT`).
    #[error("method {0} is not proxied")]
    MethodNotAllowed(Method),
    /// An absolute-form request target naming a host other than the upstream.
    #[error("request target names a host other than the upstream")]
    ForeignTarget,
    /// A request that would spend the injected key names a host that is not the proxy's.
    #[error("Host is not one of server.allowed_hosts")]
    HostNotAllowed,
    /// A browser page of an origin not in `server.cors_origins` would spend the injected key.
    #[error("Origin is not one of server.cors_origins")]
    OriginNotAllowed,
    /// A path outside `upstream.paths`.
    #[error("path is outside the forwarded API paths")]
    PathNotAllowed,
    /// Request headers over `server.max_header_bytes`.
    #[error("request headers are over server.max_header_bytes")]
    HeadersTooLarge,
    /// A request body over `server.max_request_body`.
    #[error("request body is over server.max_request_body")]
    BodyTooLarge,
    /// A request body not received within `server.header_read_timeout` of its headers.
    #[error("request body did not arrive in time")]
    BodyTimeout,
    /// A request body that broke off (the client went away or sent a malformed chunk).
    #[error("request body broke: {0}")]
    BodyBroken(String),
    /// A request TMDB is documented to refuse (bad `page`, date, too many appends, two keys),
    /// answered locally with TMDB's code.
    #[error("request refused locally with TMDB code {0}")]
    Refused(u16),
    /// The upstream answered an error status with a body that is not TMDB's.
    #[error("upstream answered {status} with a body that is not TMDB's")]
    UpstreamStatus { status: StatusCode, code: u16 },
    /// The upstream could not be reached or did not answer in time.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl From<Refusal> for ProxyError {
    fn from(refusal: Refusal) -> Self {
        Self::RateLimited(refusal)
    }
}

impl ProxyError {
    /// The TMDB status body for this error.
    pub fn body(&self) -> ErrorBody {
        match self {
            Self::MissingKey => ErrorBody::for_code(code::INVALID_API_KEY),
            Self::RateLimited(r) => ErrorBody::rate_limited(u64::from(r.count), u64::from(r.limit)),
            Self::MethodNotAllowed(_) => ErrorBody::for_code(code::METHOD_NOT_SUPPORTED),
            Self::ForeignTarget | Self::HostNotAllowed | Self::BodyBroken(_) => {
                ErrorBody::for_code(code::INVALID_INPUT)
            }
            Self::OriginNotAllowed | Self::InvalidToken => {
                ErrorBody::for_code(code::AUTHENTICATION_FAILED)
            }
            // TMDB's body for invalid input, with the status that says what was wrong.
            Self::HeadersTooLarge => ErrorBody {
                http: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                ..ErrorBody::for_code(code::INVALID_INPUT)
            },
            Self::BodyTooLarge => ErrorBody {
                http: StatusCode::PAYLOAD_TOO_LARGE,
                ..ErrorBody::for_code(code::INVALID_INPUT)
            },
            Self::BodyTimeout => ErrorBody {
                http: StatusCode::REQUEST_TIMEOUT,
                ..ErrorBody::for_code(code::INVALID_INPUT)
            },
            Self::PathNotAllowed => ErrorBody::for_code(code::NOT_FOUND),
            Self::Refused(code) | Self::UpstreamStatus { code, .. } => ErrorBody::for_code(*code),
            Self::Upstream(
                UpstreamError::Timeout(_)
                | UpstreamError::ConnectTimeout
                | UpstreamError::BodyTimeout,
            ) => ErrorBody::for_code(code::TIMED_OUT),
            Self::Upstream(UpstreamError::Failed(_)) => ErrorBody::for_code(code::BAD_GATEWAY),
            // Every upstream connection busy and the waiting room full: the proxy as a whole.
            Self::Upstream(UpstreamError::Busy(_)) => ErrorBody::for_code(code::SERVICE_OFFLINE),
        }
    }

    /// The client response: TMDB's status, body and content type.
    pub fn to_response(&self) -> Response<Bytes> {
        let body = self.body();
        let mut response = Response::new(body.to_json());
        *response.status_mut() = body.http;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(status::CONTENT_TYPE));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Reason;
    use std::time::Duration;

    #[test]
    fn rate_limited_is_429_code_25_with_the_real_figures() {
        let refusal = Refusal::new(Reason::KeyOverLimit, 50, 50, Duration::from_millis(20));
        let response = ProxyError::from(refusal).to_response();
        assert_eq!(response.status(), 429);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "application/json;charset=utf-8"
        );
        assert_eq!(
            response.body(),
            r#"{"success":false,"status_code":25,"status_message":"Your request count (51) is over the allowed limit of (50)."}"#
        );
    }

    #[test]
    fn client_limits_keep_tmdb_code_47_with_their_own_status() {
        for (error, status) in [
            (ProxyError::HeadersTooLarge, 431),
            (ProxyError::BodyTooLarge, 413),
            (ProxyError::BodyTimeout, 408),
            (ProxyError::BodyBroken("reset".into()), 400),
        ] {
            let body = error.body();
            assert_eq!((body.http.as_u16(), body.status_code), (status, 47));
        }
    }

    #[test]
    fn missing_key_is_401_code_7() {
        let body = ProxyError::MissingKey.body();
        assert_eq!((body.http.as_u16(), body.status_code), (401, 7));
    }

    #[test]
    fn upstream_failures_are_502_code_43_or_504_code_24() {
        let failed = ProxyError::from(UpstreamError::Failed("refused".into())).body();
        assert_eq!((failed.http.as_u16(), failed.status_code), (502, 43));
        let slow = ProxyError::from(UpstreamError::ConnectTimeout).body();
        assert_eq!((slow.http.as_u16(), slow.status_code), (504, 24));
    }
}
