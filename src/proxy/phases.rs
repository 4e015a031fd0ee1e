//! The proxy's phases, in order: `request_filter` (refuse, identify, limit) →
//! `upstream_request` (rewrite for the upstream) → `response_filter` (clean and annotate).
//!
//! Each phase is a plain function of its inputs so it can be read and tested on its own.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;

use super::body::ProxyBody;
use super::headers::{RateState, X_FORWARDED_FOR, insert_rate_limit, strip_hop_by_hop};
use crate::config::Secret;
use crate::error::ProxyError;
use crate::limiter::{Identity, Key, Source, key};
use crate::tmdb::API_KEY_PARAM;
use crate::upstream::{BoxError, LeasedBody, UpstreamBody};

/// Refuses what is never forwarded and identifies the request's key.
pub fn request_filter(
    parts: &Parts,
    upstream: &Uri,
    default_key: Option<Key>,
) -> Result<Identity, ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(parts.method.clone()));
    }
    // An HTTP/1 absolute-form target (`GET http://other.host/...`) asks for a forward proxy.
    // Only the configured upstream is ever contacted, so a target naming another host is refused
    // rather than silently rewritten. (HTTP/2 always carries an authority: the proxy's own.)
    if parts.version < Version::HTTP_2
        && let Some(authority) = parts.uri.authority()
        && Some(authority) != upstream.authority()
    {
        return Err(ProxyError::ForeignTarget);
    }
    key::identify(parts.uri.query(), &parts.headers, default_key).ok_or(ProxyError::MissingKey)
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

fn append_forwarded_for(headers: &mut http::HeaderMap, client_ip: IpAddr) {
    let joined = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        _ => client_ip.to_string(),
    };
    headers.remove(X_FORWARDED_FOR);
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// Cleans the upstream response for the client and adds the key's rate-limit fields. The body
/// streams through untouched (compressed bodies included).
pub fn response_filter(
    response: Response<LeasedBody>,
    rate: RateState,
    legacy_headers: bool,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    insert_rate_limit(&mut parts.headers, rate, legacy_headers);
    Response::from_parts(parts, ProxyBody::from(body))
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

    #[test]
    fn connect_and_foreign_targets_are_refused() {
        let connect = parts(Request::connect("api.themoviedb.org:443").body(()).unwrap());
        assert!(matches!(
            request_filter(&connect, &upstream(), None),
            Err(ProxyError::MethodNotAllowed(_))
        ));
        let foreign = parts(
            Request::get("http://evil.example/3/movie/1?api_key=k")
                .body(())
                .unwrap(),
        );
        assert!(matches!(
            request_filter(&foreign, &upstream(), None),
            Err(ProxyError::ForeignTarget)
        ));
        let origin = parts(Request::get("/3/movie/1?api_key=k").body(()).unwrap());
        assert!(request_filter(&origin, &upstream(), None).is_ok());
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
