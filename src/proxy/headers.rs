//! Header names the proxy reads or writes, hop-by-hop stripping, CORS, the rate-limit fields, and
//! `Retry-After` both ways.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use super::guard::Cors;
use crate::limiter::RateState;

/// IETF `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): the policy, stable per key.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// IETF `RateLimit`: what is left of the policy now.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// Legacy TMDB (2015-2019) `X-RateLimit-Limit`.
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// Legacy TMDB `X-RateLimit-Remaining`.
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// Legacy TMDB `X-RateLimit-Reset`: epoch second at which a token is next free.
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
/// `X-Forwarded-For`, appended with the client's address.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Request-Id`: kept from the client when well-formed, generated otherwise, echoed back.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Non-standard but still sent by some clients; hop-by-hop like `Connection`.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers a browser client may read on a cross-origin response: the limit fields and the id.
const EXPOSED: HeaderValue = HeaderValue::from_static(
    "retry-after, ratelimit, ratelimit-policy, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset, x-request-id",
);

/// CORS: as TMDB's API does it (`Access-Control-Allow-Origin: *` unless the upstream set one), or,
/// for an answer that spent the injected key, the one allowed origin or none (see `guard`); and
/// the limit fields exposed so browser clients can honour them.
pub fn insert_cors(headers: &mut HeaderMap, cors: &Cors) {
    match cors {
        Cors::Any => {
            headers
                .entry(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .or_insert(HeaderValue::from_static("*"));
        }
        Cors::Origin(origin) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        }
        Cors::Closed => {
            headers.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
            return;
        }
    }
    headers
        .entry(header::ACCESS_CONTROL_EXPOSE_HEADERS)
        .or_insert(EXPOSED);
}

/// Whether a request is a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`).
pub fn is_preflight(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The headers of a preflight answer: any origin, the methods TMDB serves, the request's own
/// headers allowed, cached for a day.
pub fn preflight_headers(request: &HeaderMap, response: &mut HeaderMap) {
    response.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    );
    let allowed = request
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static("authorization, content-type"));
    response.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
    response.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
}

/// Removes hop-by-hop headers, including any that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Whether a client's request id is safe to keep: 1-128 characters of `A-Za-z0-9._:-`.
pub fn is_valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Whole seconds for `Retry-After`: rounded up, at least 1 (clients sleep on it; 0 makes them spin).
pub fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Longest pause an upstream 429 may impose on a key, whatever its `Retry-After` says.
pub const MAX_UPSTREAM_PAUSE: Duration = Duration::from_secs(60);

/// How long the upstream asked to wait after a 429: `Retry-After` in seconds or as an HTTP date,
/// else one second; at most [`MAX_UPSTREAM_PAUSE`].
pub fn upstream_retry_after(headers: &HeaderMap) -> Duration {
    let value = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let wait = match value {
        Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => v
            .parse()
            .map(Duration::from_secs)
            .unwrap_or(MAX_UPSTREAM_PAUSE),
        Some(v) => httpdate::parse_http_date(v)
            .ok()
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(1)),
        None => Duration::from_secs(1),
    };
    wait.clamp(Duration::from_secs(1), MAX_UPSTREAM_PAUSE)
}

/// Adds `Retry-After` to a 429 that lacks one (TMDB's own 429 sometimes does): `wait` rounded up.
pub fn ensure_retry_after(headers: &mut HeaderMap, wait: Duration) {
    headers
        .entry(RETRY_AFTER)
        .or_insert_with(|| HeaderValue::from(retry_after_secs(wait)));
}

/// Writes the rate-limit fields of a keyed response: the IETF pair always, the legacy
/// `X-RateLimit-*` trio only when `legacy` is set.
pub fn insert_rate_limit(headers: &mut HeaderMap, state: RateState, legacy: bool) {
    let reset_secs = ceil_secs(state.reset_after);
    let policy = format!("\"per-key\";q={};w=1", state.limit);
    let current = format!("\"per-key\";r={};t={}", state.remaining, reset_secs);
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.insert(RATELIMIT_POLICY, v);
    }
    if let Ok(v) = HeaderValue::from_str(&current) {
        headers.insert(RATELIMIT, v);
    }
    if legacy {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // Rounded up: a floored reset lies in the past and makes clients spin.
        let reset_epoch = ceil_secs(now + state.reset_after);
        headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(state.limit));
        headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(state.remaining));
        headers.insert(X_RATELIMIT_RESET, HeaderValue::from(reset_epoch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1050)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn upstream_retry_after_is_seconds_or_a_date_within_bounds() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            upstream_retry_after(&h)
        };
        assert_eq!(
            upstream_retry_after(&HeaderMap::new()),
            Duration::from_secs(1)
        );
        assert_eq!(with("3"), Duration::from_secs(3));
        assert_eq!(with("0"), Duration::from_secs(1));
        assert_eq!(with("86400"), MAX_UPSTREAM_PAUSE);
        assert_eq!(with("soon"), Duration::from_secs(1));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let parsed = with(&later);
        assert!(parsed > Duration::from_secs(28) && parsed <= Duration::from_secs(30));
        let mut h = HeaderMap::new();
        ensure_retry_after(&mut h, Duration::from_millis(1200));
        ensure_retry_after(&mut h, Duration::from_secs(9));
        assert_eq!(h[RETRY_AFTER], "2", "the first value stands");
    }

    #[test]
    fn legacy_headers_only_when_asked() {
        let state = RateState {
            limit: 50,
            remaining: 0,
            reset_after: Duration::from_millis(300),
        };
        let mut h = HeaderMap::new();
        insert_rate_limit(&mut h, state, false);
        assert_eq!(h[RATELIMIT_POLICY], "\"per-key\";q=50;w=1");
        assert_eq!(h[RATELIMIT], "\"per-key\";r=0;t=1");
        assert!(!h.contains_key(X_RATELIMIT_REMAINING));
        insert_rate_limit(&mut h, state, true);
        assert_eq!(h[X_RATELIMIT_REMAINING], "0");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let reset: u64 = h[X_RATELIMIT_RESET].to_str().unwrap().parse().unwrap();
        assert!(reset > now && reset <= now + 2, "{reset} vs {now}");
    }
}
