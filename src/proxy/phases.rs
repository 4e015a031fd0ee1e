//! The proxy's phases, in order: `request_filter` (what is never forwarded, whose budget, what
//! TMDB would refuse) → `upstream_request` (rewrite for the upstream) → `response_filter` (clean
//! the answer, translate what is not TMDB's).
//!
//! Each phase is a plain function of its inputs so it can be read and tested on its own; the
//! order, the admission step between them, and the exit are `Proxy::process` and
//! `Proxy::finish`.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_LOCATION, HOST,
    HeaderValue, LOCATION,
};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use tokio::time::Instant;

use super::body::{self, Delivery, ProxyBody};
use super::ctx::{Identity, Source};
use super::headers::{self, X_FORWARDED_FOR, strip_hop_by_hop};
use crate::clients::App;
use crate::config::{QuotaSavers, Secret};
use crate::error::ProxyError;
use crate::limiter::{Key, Refusal};
use crate::tmdb::auth::{self, API_KEY_PARAM, Credential};
use crate::tmdb::{Query, rules, status};
use crate::upstream::{BoxError, LeasedBody, UpstreamBody};

/// What a request is checked against before it may spend a token.
#[derive(Debug, Clone)]
pub struct RequestRules {
    /// The upstream's scheme and authority.
    pub upstream: Uri,
    /// The key of the default key, if one is configured.
    pub default_key: Option<Key>,
    /// Path prefixes forwarded (empty: all).
    pub paths: Vec<String>,
    /// Which documented refusals are answered locally.
    pub savers: QuotaSavers,
}

/// The answer to a CORS preflight, given without a key, a token or an upstream request.
pub fn preflight(request: &HeaderMap) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    headers::preflight_headers(request, response.headers_mut());
    response
}

// === request_filter ===

/// Refuses request headers over `limit` bytes, request line included, with 431 code 47.
pub fn check_size(parts: &Parts, limit: usize) -> Result<(), ProxyError> {
    let line = parts.method.as_str().len()
        + parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + 12;
    let fields: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    match line + fields > limit {
        true => Err(ProxyError::HeadersTooLarge),
        false => Ok(()),
    }
}

/// Refuses what is never forwarded: `CONNECT`, a target naming another host, a path outside the
/// API. Nothing here spends a token.
pub fn check_target(parts: &Parts, rules: &RequestRules) -> Result<(), ProxyError> {
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
    Ok(())
}

/// Whose budget the request spends: its own credential's account, else the default key's; 401
/// code 7 without either.
pub fn identify(
    headers: &HeaderMap,
    query: &Query<'_>,
    default_key: Option<Key>,
) -> Result<Identity, ProxyError> {
    match auth::credential(query, headers) {
        Some(credential) => Ok(Identity {
            key: Key::of(&credential.account()),
            source: match credential {
                Credential::ApiKey(_) => Source::Query,
                Credential::Bearer(_) => Source::Bearer,
            },
        }),
        None => default_key
            .map(|key| Identity {
                key,
                source: Source::Default,
            })
            .ok_or(ProxyError::MissingKey),
    }
}

/// Refuses ambiguous credentials with 400 code 47: the proxy would charge one account while the
/// upstream might honour another, a way around the limit (see `tmdb::auth::is_ambiguous`).
pub fn check_credentials(query: &Query<'_>, headers: &HeaderMap) -> Result<(), ProxyError> {
    match auth::is_ambiguous(query, headers) {
        true => Err(ProxyError::Refused(status::code::INVALID_INPUT)),
        false => Ok(()),
    }
}

/// Refuses locally what TMDB is documented to refuse (the quota savers), so it spends neither a
/// token nor an upstream request.
pub fn check_query(query: &Query<'_>, savers: QuotaSavers) -> Result<(), ProxyError> {
    match rules::refused_query(query, savers) {
        Some(code) => Err(ProxyError::Refused(code)),
        None => Ok(()),
    }
}

// === upstream_request ===

/// Reads the request body whole, by `deadline`: at most `limit` bytes (413 code 47 beyond,
/// whether the length is declared or the body is chunked; 408 code 47 past the deadline). A body
/// in hand cannot stall an upstream connection while it uploads.
pub async fn read_request_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
    deadline: Instant,
) -> Result<UpstreamBody, ProxyError>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(Empty::new().map_err(|never| match never {}).boxed());
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ProxyError::BodyTooLarge);
    }
    match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ProxyError::BodyTimeout),
        Ok(Ok(collected)) => Ok(Full::new(collected.to_bytes())
            .map_err(|never| match never {})
            .boxed()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge),
        Ok(Err(error)) => Err(ProxyError::BodyBroken(error.to_string())),
    }
}

/// The path and query to send upstream: the client's, byte for byte, unless the proxy sends the
/// request with a key of its own (`inject`: the default key, or an app's), which replaces every
/// `api_key` pair; it is added as `api_key` when the flag says so (an app's v4 token goes in
/// `Authorization` instead, see [`send_as_app`]).
pub fn upstream_target(
    uri: &Uri,
    query: &Query<'_>,
    inject: Option<(&Secret, bool)>,
) -> Option<PathAndQuery> {
    let Some((secret, as_query)) = inject else {
        return uri.path_and_query().cloned();
    };
    let mut pq = String::with_capacity(uri.path().len() + uri.query().map_or(0, str::len) + 48);
    pq.push_str(uri.path());
    pq.push('?');
    for raw in query.raw_without(API_KEY_PARAM) {
        pq.push_str(raw);
        pq.push('&');
    }
    if as_query {
        pq.push_str(API_KEY_PARAM);
        pq.push('=');
        pq.extend(form_urlencoded::byte_serialize(secret.expose().as_bytes()));
    } else {
        pq.pop();
    }
    PathAndQuery::try_from(pq).ok()
}

/// A request of `app` carries the app's credential and no other: the client's `Authorization`
/// goes, and an app sent with a v4 token gets it there.
pub fn send_as_app(headers: &mut HeaderMap, app: &App) {
    headers.remove(AUTHORIZATION);
    if app.bearer {
        let value = format!("{}{}", auth::BEARER_PREFIX, app.credential.expose());
        if let Ok(mut value) = HeaderValue::try_from(value) {
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
    }
}

/// Builds the upstream request: `target` in origin-form (`GET /3/movie/550?... HTTP/1.1`) with
/// the upstream's `Host`, no hop-by-hop headers, the client's address appended to
/// `X-Forwarded-For`, HTTP/1.1 whatever the client spoke. The body streams through untouched.
pub fn upstream_request(
    mut parts: Parts,
    body: UpstreamBody,
    target: Option<PathAndQuery>,
    upstream: &Uri,
    client_ip: IpAddr,
) -> Result<Request<UpstreamBody>, ProxyError> {
    let target = target.unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(target);
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    restrict_accept_encoding(&mut parts.headers);
    let host = upstream
        .authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
        .ok_or(ProxyError::ForeignTarget)?;
    parts.headers.insert(HOST, host);
    append_forwarded_for(&mut parts.headers, client_ip);
    Ok(Request::from_parts(parts, body))
}

/// Removes the injected default key from a redirect's `Location` and `Content-Location`, so it
/// never comes back to a client that did not send it.
pub fn strip_injected_key(headers: &mut HeaderMap) {
    for name in [LOCATION, CONTENT_LOCATION] {
        let rebuilt = headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(without_api_key);
        if let Some(rebuilt) = rebuilt {
            match HeaderValue::from_str(&rebuilt) {
                Ok(value) => headers.insert(name, value),
                Err(_) => headers.remove(name),
            };
        }
    }
}

/// A URI reference without its `api_key` pairs, or `None` if it has none.
fn without_api_key(reference: &str) -> Option<String> {
    let (before, fragment) = match reference.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (reference, None),
    };
    let (path, query) = before.split_once('?')?;
    let parsed = Query::parse(Some(query));
    if !parsed.pairs().iter().any(|pair| pair.name == API_KEY_PARAM) {
        return None;
    }
    let kept: Vec<&str> = parsed.raw_without(API_KEY_PARAM).collect();
    let mut rebuilt = path.to_owned();
    if !kept.is_empty() {
        rebuilt.push('?');
        rebuilt.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        rebuilt.push('#');
        rebuilt.push_str(fragment);
    }
    Some(rebuilt)
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

// === response_filter ===

/// Most bytes of an upstream error body read to decide whether it is TMDB's. TMDB's own are a
/// few hundred bytes; anything longer is an error page.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Cleans the upstream response for the client.
///
/// Success and redirect bodies pass through untouched (compressed ones included), held for the
/// client so the upstream connection is free as soon as the upstream is done (see `body`). For an
/// error status the body is read (up to 64 KiB, by `deadline`): a TMDB JSON body passes through
/// byte for byte; anything else becomes TMDB's body for the matching code, with a status the
/// client can act on. `upstream_429` is the refusal to show for a 429 whose body is not TMDB's.
pub async fn response_filter(
    response: Response<LeasedBody>,
    upstream_429: Option<Refusal>,
    delivery: Delivery,
    deadline: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if parts.status.as_u16() < 400 {
        let body = body::deliver(body, delivery, deadline).await?;
        return Ok(Response::from_parts(parts, body));
    }
    let bytes = body.read_bounded(MAX_ERROR_BODY, deadline).await?;
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
        return Ok(Response::from_parts(parts, ProxyBody::full(bytes)));
    }
    if let Some(refusal) = upstream_429 {
        return Err(ProxyError::RateLimited(refusal));
    }
    Err(ProxyError::UpstreamStatus {
        status: parts.status,
        code: code.unwrap_or(status::code::INTERNAL_ERROR),
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

    /// The request filter's three steps, in the order `Proxy::process` runs them.
    fn request_filter(target: &str) -> Result<Identity, ProxyError> {
        let parts = parts(Request::get(target).body(()).unwrap());
        let query = Query::parse(parts.uri.query());
        check_target(&parts, &rules())?;
        check_credentials(&query, &parts.headers)?;
        let identity = identify(&parts.headers, &query, None)?;
        check_query(&query, QuotaSavers::ALL)?;
        Ok(identity)
    }

    #[test]
    fn connect_and_foreign_targets_are_refused() {
        let connect = parts(Request::connect("api.themoviedb.org:443").body(()).unwrap());
        assert!(matches!(
            check_target(&connect, &rules()),
            Err(ProxyError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            request_filter("http://evil.example/3/movie/1?api_key=k"),
            Err(ProxyError::ForeignTarget)
        ));
        assert_eq!(
            request_filter("/3/movie/1?api_key=k").unwrap(),
            Identity {
                key: Key::of("k"),
                source: Source::Query
            }
        );
        assert!(matches!(
            request_filter("/admin?api_key=k"),
            Err(ProxyError::PathNotAllowed)
        ));
        assert!(matches!(
            request_filter("/3/discover/movie?api_key=k&page=0"),
            Err(ProxyError::Refused(22))
        ));
        assert!(matches!(
            request_filter("/3/movie/1?api_key=A&api_key=B"),
            Err(ProxyError::Refused(47))
        ));
        // No key outranks a bad page: 401 first, as TMDB does.
        assert!(matches!(
            request_filter("/3/discover/movie?page=0"),
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
        let query = Query::parse(p.uri.query());
        let identity = identify(&p.headers, &query, Some(Key::of("D+1"))).unwrap();
        assert_eq!(identity.source, Source::Default);
        let target = upstream_target(&p.uri, &query, Some((&Secret::new("D+1"), true)));
        drop(query);
        let req = upstream_request(
            p,
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
            target,
            &upstream(),
            "10.0.0.1".parse().unwrap(),
        )
        .unwrap();
        // Origin-form, with the upstream's Host.
        assert_eq!(
            req.uri().to_string(),
            "/3/movie/550?language=en-US&api_key=D%2B1"
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
        let parts = parts(req);
        let query = Query::parse(parts.uri.query());
        let identity = identify(&parts.headers, &query, None).unwrap();
        assert_eq!(identity.source, Source::Query);
        // A request with a key of its own has nothing injected.
        let target = upstream_target(&parts.uri, &query, None);
        drop(query);
        let up = upstream_request(
            parts,
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
            target,
            &upstream(),
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

    #[test]
    fn an_injected_key_is_taken_out_of_redirects() {
        let mut h = HeaderMap::new();
        h.insert(
            LOCATION,
            HeaderValue::from_static(
                "https://api.themoviedb.org/3/movie/550?language=de&api_key=SECRET#x",
            ),
        );
        h.insert(
            CONTENT_LOCATION,
            HeaderValue::from_static("/3/movie/550?api_key=SECRET"),
        );
        strip_injected_key(&mut h);
        assert_eq!(
            h[LOCATION],
            "https://api.themoviedb.org/3/movie/550?language=de#x"
        );
        assert_eq!(h[CONTENT_LOCATION], "/3/movie/550");
        let mut untouched = HeaderMap::new();
        untouched.insert(LOCATION, HeaderValue::from_static("/3/movie/550?page=2"));
        strip_injected_key(&mut untouched);
        assert_eq!(untouched[LOCATION], "/3/movie/550?page=2");
    }
}
