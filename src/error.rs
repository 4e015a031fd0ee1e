//! The proxy's error type and the one function that turns an error into a client response.
//!
//! Other modules return errors; only [`ProxyError::into_response`] builds an error response, so
//! every failure a client sees is a TMDB status body from the table in [`crate::tmdb::status`].

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Response, StatusCode};

use crate::limiter::Rejection;
use crate::proxy::body::ProxyBody;
use crate::proxy::headers::retry_after_secs;
use crate::tmdb::ErrorBody;
use crate::tmdb::status::{self, code};
use crate::upstream::UpstreamError;

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No `api_key`, no bearer token, and no default key configured.
    #[error("request carries no API key and no default key is configured")]
    MissingKey,
    /// The key is over its limit (and the wait would exceed `max_wait`).
    #[error("rate limited: {} requests in the window, limit {}", .0.count, .0.limit)]
    RateLimited(Rejection),
    /// A method the proxy never forwards (`CONNECT`).
    #[error("method {0} is not proxied")]
    MethodNotAllowed(Method),
    /// An absolute-form request target naming a host other than the upstream.
    #[error("request target names a host other than the upstream")]
    ForeignTarget,
    /// A path outside `upstream.paths`.
    #[error("path is outside the forwarded API paths")]
    PathNotAllowed,
    /// A request TMDB is documented to refuse (bad `page`, date, too many appends), answered
    /// locally with TMDB's code.
    #[error("request refused locally with TMDB code {0}")]
    Refused(u16),
    /// The upstream answered an error status with a body that is not TMDB's.
    #[error("upstream answered {status} with a body that is not TMDB's")]
    UpstreamStatus { status: StatusCode, code: u16 },
    /// The upstream answered 429 with a body that is not TMDB's.
    #[error("upstream answered 429")]
    UpstreamRateLimited(Rejection),
    /// The upstream could not be reached or did not answer in time.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl ProxyError {
    /// The TMDB status body for this error.
    pub fn body(&self) -> ErrorBody {
        match self {
            Self::MissingKey => ErrorBody::for_code(code::INVALID_API_KEY),
            Self::RateLimited(r) => ErrorBody::rate_limited(u64::from(r.count), u64::from(r.limit)),
            Self::MethodNotAllowed(_) => ErrorBody::for_code(code::METHOD_NOT_SUPPORTED),
            Self::ForeignTarget => ErrorBody::for_code(code::INVALID_INPUT),
            Self::PathNotAllowed => ErrorBody::for_code(code::NOT_FOUND),
            Self::Refused(code) | Self::UpstreamStatus { code, .. } => ErrorBody::for_code(*code),
            Self::UpstreamRateLimited(r) => {
                ErrorBody::rate_limited(u64::from(r.count), u64::from(r.limit))
            }
            Self::Upstream(
                UpstreamError::Timeout(_)
                | UpstreamError::ConnectTimeout
                | UpstreamError::BodyTimeout,
            ) => ErrorBody::for_code(code::TIMED_OUT),
            Self::Upstream(UpstreamError::Failed(_)) => ErrorBody::for_code(code::BAD_GATEWAY),
        }
    }

    /// The client response: TMDB's status, body and content type, plus `Retry-After` on a 429.
    pub fn into_response(&self) -> Response<ProxyBody> {
        let body = self.body();
        let mut response = Response::new(ProxyBody::full(body.to_json()));
        *response.status_mut() = body.http;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(status::CONTENT_TYPE));
        if let Self::RateLimited(r) | Self::UpstreamRateLimited(r) = self {
            headers.insert(
                RETRY_AFTER,
                HeaderValue::from(retry_after_secs(r.retry_after)),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limited_is_429_code_25_with_retry_after() {
        let err = ProxyError::RateLimited(Rejection {
            limit: 50,
            count: 51,
            retry_after: Duration::from_millis(20),
        });
        let response = err.into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "application/json;charset=utf-8"
        );
    }

    #[test]
    fn missing_key_is_401_code_7() {
        let body = ProxyError::MissingKey.body();
        assert_eq!((body.http.as_u16(), body.status_code), (401, 7));
    }
}
