//! What may be cached, under which key, and for how long.
//!
//! TMDB marks private and error responses `public` too (`/3/account` sends `public, max-age=0`,
//! an invalid-key 401 `public, max-age=300`), so these rules, not TMDB's headers, decide what is
//! shared. Only TMDB's `max-age` is read, as a hint for how long public data stays fresh.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};

use crate::tmdb::Query;
use crate::tmdb::auth;
use crate::tmdb::status::code;

/// Why a request is not answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Not a `GET` or `HEAD`.
    Method,
    /// A `session_id` or `guest_session_id`: the answer is the user's.
    Session,
    /// An account, authentication, guest session, account state, rating or list path, or `/4/`.
    PrivatePath,
    /// `append_to_response` asks for `account_states`.
    PrivateAppend,
    /// A bearer token with more than read access (a user's token).
    UserToken,
    /// A client's `Cache-Control: no-cache`, with `cache.honor_client_no_cache` on.
    ClientNoCache,
}

/// Path segments whose answers belong to a user.
const PRIVATE_SEGMENTS: &[&str] = &[
    "account",
    "authentication",
    "guest_session",
    "account_states",
    "rating",
    "list",
    "lists",
];

/// The cache key of a request, or why it bypasses the cache: method (`HEAD` reads the `GET`
/// entry), path, and the query's pairs sorted by name, without `api_key`. No credential is in it,
/// so different keys share public entries.
pub fn key(
    method: &Method,
    path: &str,
    query: &Query<'_>,
    headers: &HeaderMap,
    honor_no_cache: bool,
) -> Result<String, Bypass> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Bypass::Method);
    }
    // A percent-encoded path could hide a private segment from the check below (TMDB decodes
    // paths): such requests are not cached at all.
    if path.starts_with("/4/") || path == "/4" || path.contains('%') {
        return Err(Bypass::PrivatePath);
    }
    let lower = path.to_ascii_lowercase();
    if lower
        .split('/')
        .any(|segment| PRIVATE_SEGMENTS.contains(&segment))
    {
        return Err(Bypass::PrivatePath);
    }
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for pair in query.pairs() {
        // `;` may separate pairs for the upstream: a pair hiding another is not cached.
        if pair.raw.contains(';') {
            return Err(Bypass::Session);
        }
        match pair.name.as_ref() {
            "api_key" => continue,
            "session_id" | "guest_session_id" => return Err(Bypass::Session),
            "append_to_response" if pair.value.to_ascii_lowercase().contains("account_states") => {
                return Err(Bypass::PrivateAppend);
            }
            name => pairs.push((name, pair.raw)),
        }
    }
    if auth::bearer_token(headers).is_some_and(auth::may_write) {
        return Err(Bypass::UserToken);
    }
    if honor_no_cache && asks_no_cache(headers) {
        return Err(Bypass::ClientNoCache);
    }
    // Stable: pairs of one name keep their order.
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let mut key = String::with_capacity(path.len() + 64);
    key.push_str(path);
    for (i, (_, raw)) in pairs.iter().enumerate() {
        key.push(if i == 0 { '?' } else { '&' });
        key.push_str(raw);
    }
    Ok(key)
}

fn asks_no_cache(headers: &HeaderMap) -> bool {
    let directives = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase());
    directives
        .into_iter()
        .any(|d| d == "no-cache" || d == "no-store" || d == "max-age=0")
        || headers
            .get(http::header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("no-cache"))
}

/// How long TMDB data of this path may be kept at most, under `max_ttl`: configuration and
/// reference lists change rarely; details hourly at most; lists that move (search, discover,
/// trending, popular, now playing, changes) within minutes.
pub fn class_ceiling(path: &str) -> Duration {
    const MINUTES: &[&str] = &[
        "search",
        "discover",
        "trending",
        "changes",
        "popular",
        "top_rated",
        "now_playing",
        "upcoming",
        "airing_today",
        "on_the_air",
        "latest",
    ];
    const DAYS: &[&str] = &[
        "configuration",
        "genre",
        "certification",
        "watch",
        "timezones",
        "languages",
        "countries",
        "jobs",
        "primary_translations",
    ];
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| MINUTES.contains(s)) {
        Duration::from_secs(10 * 60)
    } else if segments.get(1).is_some_and(|s| DAYS.contains(s)) {
        Duration::from_secs(24 * 60 * 60)
    } else {
        Duration::from_secs(6 * 60 * 60)
    }
}

/// How long an answer stays fresh, if it may be stored at all: a 200 by TMDB's `max-age` less its
/// `Age`, between `min_ttl` and the path's ceiling (itself under `max_ttl`); a 404 code 34 for
/// `negative_ttl`. Never 401, 403, 429 or 5xx, whatever their headers say.
pub fn freshness(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    path: &str,
    cfg: &crate::config::CacheConfig,
) -> Option<Duration> {
    let ceiling = class_ceiling(path).min(cfg.max_ttl);
    match status {
        StatusCode::OK => {
            let max_age = max_age(headers).unwrap_or(Duration::ZERO);
            let age = header_secs(headers, http::header::AGE).unwrap_or(Duration::ZERO);
            Some(max_age.saturating_sub(age).max(cfg.min_ttl).min(ceiling))
        }
        StatusCode::NOT_FOUND if is_tmdb_not_found(body) => Some(cfg.negative_ttl.min(ceiling)),
        _ => None,
    }
}

fn is_tmdb_not_found(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("status_code").and_then(serde_json::Value::as_u64))
        == Some(u64::from(code::NOT_FOUND))
}

fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| {
            let d = d.trim();
            let value = d
                .strip_prefix("max-age=")
                .or_else(|| d.strip_prefix("s-maxage="))?;
            value.trim_matches('"').parse::<u64>().ok()
        })
        .map(Duration::from_secs)
}

fn header_secs(headers: &HeaderMap, name: http::header::HeaderName) -> Option<Duration> {
    let value = headers
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(method: Method, target: &str, headers: &HeaderMap) -> Result<String, Bypass> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        key(&method, path, &Query::parse(Some(query)), headers, false)
    }

    #[test]
    fn keys_leave_out_the_credential_and_sort_the_pairs() {
        let none = HeaderMap::new();
        let a = key_of(
            Method::GET,
            "/3/movie/550?api_key=A&language=de&page=2",
            &none,
        );
        let b = key_of(
            Method::GET,
            "/3/movie/550?page=2&language=de&api_key=B",
            &none,
        );
        assert_eq!(a, Ok("/3/movie/550?language=de&page=2".to_owned()));
        assert_eq!(a, b);
        assert_eq!(
            key_of(
                Method::HEAD,
                "/3/movie/550?api_key=A&page=2&language=de",
                &none
            ),
            a
        );
        assert_eq!(
            key_of(
                Method::GET,
                "/3/movie/550?append_to_response=videos,images",
                &none
            ),
            Ok("/3/movie/550?append_to_response=videos,images".to_owned())
        );
    }

    #[test]
    fn private_requests_bypass() {
        let none = HeaderMap::new();
        for (method, target, why) in [
            (Method::POST, "/3/movie/550/rating", Bypass::Method),
            (Method::GET, "/3/movie/550?session_id=S", Bypass::Session),
            (
                Method::GET,
                "/3/movie/550?guest_session_id=G",
                Bypass::Session,
            ),
            (
                Method::GET,
                "/3/account/1/favorite/movies",
                Bypass::PrivatePath,
            ),
            (
                Method::GET,
                "/3/authentication/token/new",
                Bypass::PrivatePath,
            ),
            (
                Method::GET,
                "/3/movie/550/account_states",
                Bypass::PrivatePath,
            ),
            (Method::GET, "/3/list/1", Bypass::PrivatePath),
            (Method::GET, "/4/list/1", Bypass::PrivatePath),
            (
                Method::GET,
                "/3/guest_session/G/rated/movies",
                Bypass::PrivatePath,
            ),
            (
                Method::GET,
                "/3/%67uest_session/G/rated/movies",
                Bypass::PrivatePath,
            ),
            (Method::GET, "/3/ACCOUNT/1", Bypass::PrivatePath),
            (Method::GET, "/3/movie/1?x=1;session_id=S", Bypass::Session),
            (Method::GET, "/3/movie/1?%73ession_id=S", Bypass::Session),
            (
                Method::GET,
                "/3/movie/550?append_to_response=videos,account_states",
                Bypass::PrivateAppend,
            ),
        ] {
            assert_eq!(key_of(method, target, &none), Err(why), "{target}");
        }
    }

    #[test]
    fn freshness_is_clamped_and_errors_are_never_stored() {
        let cfg = crate::config::Config::from_toml_str("").unwrap().cache;
        let with = |cc: &str, age: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CACHE_CONTROL, cc.parse().unwrap());
            if let Some(age) = age {
                h.insert(http::header::AGE, age.parse().unwrap());
            }
            h
        };
        let ok = StatusCode::OK;
        let movie = "/3/movie/550";
        let secs = Duration::from_secs;
        // TMDB's max-age less its Age, floored at min_ttl, under the class ceiling.
        assert_eq!(
            freshness(
                ok,
                &with("public, max-age=600", Some("100")),
                b"{}",
                movie,
                &cfg
            ),
            Some(secs(500))
        );
        assert_eq!(
            freshness(ok, &with("public, max-age=0", None), b"{}", movie, &cfg),
            Some(secs(60))
        );
        assert_eq!(
            freshness(ok, &with("public, max-age=99999", None), b"{}", movie, &cfg),
            Some(secs(6 * 3600))
        );
        assert_eq!(
            freshness(
                ok,
                &with("public, max-age=99999", None),
                b"{}",
                "/3/search/movie",
                &cfg
            ),
            Some(secs(600))
        );
        let not_found = br#"{"success":false,"status_code":34,"status_message":"x"}"#;
        assert_eq!(
            freshness(
                StatusCode::NOT_FOUND,
                &HeaderMap::new(),
                not_found,
                movie,
                &cfg
            ),
            Some(secs(60))
        );
        for status in [401, 403, 429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                freshness(
                    status,
                    &with("public, max-age=300", None),
                    b"{}",
                    movie,
                    &cfg
                ),
                None
            );
        }
        assert_eq!(
            freshness(
                StatusCode::NOT_FOUND,
                &HeaderMap::new(),
                b"<html>",
                movie,
                &cfg
            ),
            None
        );
    }
}
