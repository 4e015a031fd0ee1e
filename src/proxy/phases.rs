//! The proxy's phases, in order: `request_filter` (refuse, identify, limit) →
//! `upstream_request` (rewrite for the upstream) → `response_filter` (clean and annotate).
//!
//! Each phase is a plain function of its inputs so it can be read and tested on its own.

use std::net::IpAddr;

use bytes::Bytes;
use std::time::{Duration, SystemTime};

use http::header::{
    ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, HOST, HeaderValue, RETRY_AFTER,
};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;

use super::body::ProxyBody;
use super::headers::{RateState, X_FORWARDED_FOR, retry_after_secs, strip_hop_by_hop};
use crate::config::{QuotaSavers, Secret};
use crate::error::ProxyError;
use crate::limiter::{Identity, Key, Rejection, Source, key};
use crate::tmdb::{API_KEY_PARAM, rules, status};
use crate::upstream::{BoxError, LeasedBody, UpstreamBody, UpstreamError};

/// What a request is checked against before it may spend a token.
#[derive(Debug, Clone)]
pub struct RequestRules {
    /// The upstream's scheme and authority.
    pub upstream: Uri,
    /// Hash of the default key, if one is configured.
    pub default_key: Option<Key>,
    /// Path prefixes forwarded (empty: all).
    pub paths: Vec<String>,
    /// Which documented refusals are answered locally.
    pub savers: QuotaSavers,
}

/// Refuses what is never forwarded, identifies the request's key, and refuses locally what TMDB
/// is documented to refuse. Nothing here spends a token.
pub fn request_filter(parts: &Parts, rules: &RequestRules) -> Result<Identity, ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(parts.method.clone()));
    }
    // An HTTP/1 absolute-form target (`GET http://other.host/...`) asks for a forward proxy.
    // Only the configured upstream is ever contacted, so a target naming another host is refused
    // rather than silently rewritten. (HTTP/2 always carries an authority: the proxy's own.)
    if parts.version < Version::HTTP_2
        && let Some(authority) = parts.uri.authority()
        && Some(authority) != rules.upstream.authority()
    {
        return Err(ProxyError::ForeignTarget);
    }
    if !rules::path_allowed(parts.uri.path(), &rules.paths) {
        return Err(ProxyError::PathNotAllowed);
    }
    let identity = identify(parts, rules).ok_or(ProxyError::MissingKey)?;
    // Two different keys in one query: the proxy would bucket one while the upstream might honour
    // the other, a way around the limit.
    if parts.uri.query().is_some_and(key::has_conflicting_api_keys) {
        return Err(ProxyError::Refused(status::code::INVALID_INPUT));
    }
    if let Some(code) = parts
        .uri
        .query()
        .and_then(|q| rules::refused_query(q, rules.savers))
    {
        return Err(ProxyError::Refused(code));
    }
    Ok(identity)
}

/// The request's key, if it has one (see [`key::identify`]).
pub fn identify(parts: &Parts, rules: &RequestRules) -> Option<Identity> {
    key::identify(parts.uri.query(), &parts.headers, rules.default_key)
}

/// Builds the upstream request: the upstream's URI and `Host`, no hop-by-hop headers, the
/// client's address appended to `X-Forwarded-For`, the default key injected when the request had
/// none, HTTP/1.1 whatever the client spoke. The body streams through untouched.
pub fn upstream_request<B>(
    mut parts: Parts,
    body: B,
    identity: Identity,
    upstream: &Uri,
    default_key: Option<&Secret>,
    client_ip: IpAddr,
) -> Result<Request<UpstreamBody>, ProxyError>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let path_and_query = match (identity.source, default_key) {
        (Source::Default, Some(secret)) => with_api_key(&parts.uri, secret.expose()),
        _ => parts.uri.path_and_query().cloned(),
    };
    let mut uri = Uri::builder()
        .scheme(upstream.scheme().cloned().unwrap_or(Scheme::HTTPS))
        .authority(
            upstream
                .authority()
                .cloned()
                .unwrap_or_else(|| Authority::from_static("localhost")),
        );
    if let Some(pq) = path_and_query {
        uri = uri.path_and_query(pq);
    } else {
        uri = uri.path_and_query("/");
    }
    parts.uri = uri.build().map_err(|_| ProxyError::ForeignTarget)?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    restrict_accept_encoding(&mut parts.headers);
    if let Some(authority) = upstream.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(HOST, host);
    }
    append_forwarded_for(&mut parts.headers, client_ip);
    let body = body.map_err(Into::into).boxed();
    Ok(Request::from_parts(parts, body))
}

/// The client's path and query with any `api_key` pair replaced by `key`.
fn with_api_key(uri: &Uri, key: &str) -> Option<PathAndQuery> {
    let mut pq = String::with_capacity(uri.path().len() + uri.query().map_or(0, str::len) + 48);
    pq.push_str(uri.path());
    pq.push('?');
    for pair in uri.query().unwrap_or_default().split('&') {
        let name = pair.split('=').next().unwrap_or_default();
        if pair.is_empty() || name == API_KEY_PARAM {
            continue;
        }
        pq.push_str(pair);
        pq.push('&');
    }
    pq.push_str(API_KEY_PARAM);
    pq.push('=');
    pq.extend(form_urlencoded::byte_serialize(key.as_bytes()));
    PathAndQuery::try_from(pq).ok()
}

/// Keeps only the content codings the proxy can read (gzip, deflate, identity) in
/// `Accept-Encoding`, so an error body can always be inspected; success bodies still come
/// compressed and pass through untouched.
fn restrict_accept_encoding(headers: &mut http::HeaderMap) {
    let Some(value) = headers.get(ACCEPT_ENCODING).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let kept: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|coding| {
            let name = coding.split(';').next().unwrap_or_default().trim();
            ["gzip", "x-gzip", "deflate", "identity"]
                .iter()
                .any(|ok| name.eq_ignore_ascii_case(ok))
        })
        .collect();
    if kept.is_empty() {
        headers.remove(ACCEPT_ENCODING);
    } else if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        headers.insert(ACCEPT_ENCODING, v);
    }
}

fn append_forwarded_for(headers: &mut http::HeaderMap, client_ip: IpAddr) {
    let mut joined = String::new();
    for prior in headers.get_all(X_FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str()
            && !prior.trim().is_empty()
        {
            joined.push_str(prior.trim());
            joined.push_str(", ");
        }
    }
    joined.push_str(&client_ip.to_string());
    headers.remove(X_FORWARDED_FOR);
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// Most bytes of an upstream error body read to decide whether it is TMDB's. TMDB's own are a
/// few hundred bytes; anything longer is an error page.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Longest pause an upstream 429 may impose on a key, whatever its `Retry-After` says.
pub const MAX_UPSTREAM_PAUSE: Duration = Duration::from_secs(60);

/// How long the upstream asked to wait after a 429: `Retry-After` in seconds or as an HTTP date,
/// else one second; at most [`MAX_UPSTREAM_PAUSE`].
pub fn upstream_retry_after(headers: &http::HeaderMap) -> Duration {
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

/// Cleans the upstream response for the client and adds the key's rate-limit fields.
///
/// Success and redirect responses stream through untouched (compressed bodies included). For an
/// error status the body is read (up to 64 KiB): a TMDB JSON body passes through byte for byte;
/// anything else becomes TMDB's body for the matching code, with a status the client can act on.
/// `upstream_429` carries the pause the upstream asked for when it answered 429, and `rate` the
/// key's state for the 429 body.
pub async fn response_filter(
    response: Response<LeasedBody>,
    rate: RateState,
    upstream_429: Option<Duration>,
    deadline: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if parts.status.as_u16() < 400 {
        return Ok(Response::from_parts(parts, ProxyBody::from(body)));
    }
    let read =
        tokio::time::timeout_at(deadline, Limited::new(body, MAX_ERROR_BODY).collect()).await;
    let bytes = match read {
        Err(_) => return Err(UpstreamError::BodyTimeout.into()),
        Ok(Ok(collected)) => Some(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => None,
        Ok(Err(error)) => {
            return Err(UpstreamError::Failed(format!("error body broke: {error}")).into());
        }
    };
    // Whether the body is TMDB's, and if not, the code it maps to.
    let (is_tmdb, code) = {
        let inspectable = bytes.as_ref().and_then(|b| decoded(&parts.headers, b));
        match &inspectable {
            Some(Inspect::Plain(text)) => (
                rules::is_tmdb_body(text),
                rules::code_for_upstream_error(parts.status, text),
            ),
            // An encoding the proxy cannot read: TMDB's edge compressed it, so it is TMDB's.
            Some(Inspect::Opaque) => (true, None),
            None => (false, rules::code_for_upstream_error(parts.status, &[])),
        }
    };
    if let (true, Some(bytes)) = (is_tmdb, bytes) {
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        if let Some(wait) = upstream_429 {
            parts
                .headers
                .entry(RETRY_AFTER)
                .or_insert_with(|| HeaderValue::from(retry_after_secs(wait)));
        }
        return Ok(Response::from_parts(parts, ProxyBody::full(bytes)));
    }
    if let Some(wait) = upstream_429 {
        let limit = rate.limit;
        let count = limit
            .saturating_sub(rate.remaining)
            .max(limit)
            .saturating_add(1);
        return Err(ProxyError::UpstreamRateLimited(Rejection {
            limit,
            count,
            retry_after: wait,
        }));
    }
    let code = code.unwrap_or(status::code::INTERNAL_ERROR);
    Err(ProxyError::UpstreamStatus {
        status: parts.status,
        code,
    })
}

/// An error body as the proxy can read it.
enum Inspect<'a> {
    Plain(std::borrow::Cow<'a, [u8]>),
    /// Compressed with an encoding the proxy does not decode.
    Opaque,
}

/// The body decoded for inspection (identity, gzip, deflate). `None`: it claims an encoding it
/// does not have, so it is nobody's well-formed body.
fn decoded<'a>(headers: &http::HeaderMap, body: &'a [u8]) -> Option<Inspect<'a>> {
    use std::io::Read;
    let encoding = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let mut out = Vec::new();
    let limit = MAX_ERROR_BODY as u64;
    match encoding.as_deref() {
        None | Some("" | "identity") => Some(Inspect::Plain(body.into())),
        Some("gzip" | "x-gzip") => flate2::read::GzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out)
            .ok()
            .map(|_| Inspect::Plain(out.into())),
        Some("deflate") => flate2::read::ZlibDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out)
            .ok()
            .map(|_| Inspect::Plain(out.into())),
        Some(_) => Some(Inspect::Opaque),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    fn upstream() -> Uri {
        Uri::from_static("https://api.themoviedb.org")
    }

    fn rules() -> RequestRules {
        RequestRules {
            upstream: upstream(),
            default_key: None,
            paths: vec!["/3/".into(), "/4/".into()],
            savers: QuotaSavers::ALL,
        }
    }

    #[test]
    fn connect_and_foreign_targets_are_refused() {
        let connect = parts(Request::connect("api.themoviedb.org:443").body(()).unwrap());
        assert!(matches!(
            request_filter(&connect, &rules()),
            Err(ProxyError::MethodNotAllowed(_))
        ));
        let foreign = parts(
            Request::get("http://evil.example/3/movie/1?api_key=k")
                .body(())
                .unwrap(),
        );
        assert!(matches!(
            request_filter(&foreign, &rules()),
            Err(ProxyError::ForeignTarget)
        ));
        let origin = parts(Request::get("/3/movie/1?api_key=k").body(()).unwrap());
        assert!(request_filter(&origin, &rules()).is_ok());
        let outside = parts(Request::get("/admin?api_key=k").body(()).unwrap());
        assert!(matches!(
            request_filter(&outside, &rules()),
            Err(ProxyError::PathNotAllowed)
        ));
        let bad_page = parts(
            Request::get("/3/discover/movie?api_key=k&page=0")
                .body(())
                .unwrap(),
        );
        assert!(matches!(
            request_filter(&bad_page, &rules()),
            Err(ProxyError::Refused(22))
        ));
        // No key outranks a bad page: 401 first, as TMDB does.
        let no_key = parts(Request::get("/3/discover/movie?page=0").body(()).unwrap());
        assert!(matches!(
            request_filter(&no_key, &rules()),
            Err(ProxyError::MissingKey)
        ));
    }

    #[test]
    fn default_key_is_injected_and_empty_pairs_dropped() {
        let p = parts(
            Request::get("/3/movie/550?&&language=en-US&api_key=")
                .body(())
                .unwrap(),
        );
        let identity = Identity {
            key: Key::from_credential("D"),
            source: Source::Default,
        };
        let req = upstream_request(
            p,
            Empty::<Bytes>::new(),
            identity,
            &upstream(),
            Some(&Secret::new("D+1")),
            "10.0.0.1".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            req.uri().to_string(),
            "https://api.themoviedb.org/3/movie/550?language=en-US&api_key=D%2B1"
        );
        assert_eq!(req.headers()[HOST], "api.themoviedb.org");
        assert_eq!(req.headers()[X_FORWARDED_FOR], "10.0.0.1");
    }

    #[test]
    fn client_query_is_forwarded_verbatim() {
        let mut req =
            Request::get("/3/search/movie?api_key=K&&query=a%20b&include_image_language=null")
                .header("x-forwarded-for", "1.2.3.4")
                .header("connection", "close")
                .body(())
                .unwrap();
        *req.version_mut() = Version::HTTP_2;
        let identity = Identity {
            key: Key::from_credential("K"),
            source: Source::Query,
        };
        let up = upstream_request(
            parts(req),
            Empty::<Bytes>::new(),
            identity,
            &upstream(),
            None,
            "::1".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(
            up.uri().query(),
            Some("api_key=K&&query=a%20b&include_image_language=null")
        );
        assert_eq!(up.version(), Version::HTTP_11);
        assert_eq!(up.headers()[X_FORWARDED_FOR], "1.2.3.4, ::1");
        assert!(!up.headers().contains_key("connection"));
    }
}
