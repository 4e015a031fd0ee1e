//! Which budget a request draws from.
//!
//! A request's key is its `api_key` query parameter, else its `Authorization: Bearer` token, else
//! the configured default key. A TMDB v4 read token is a JWT whose payload's `aud` claim is the
//! account's v3 API key, so such a token is bucketed under that key and one account's v3 and v4
//! traffic share one budget. Pure functions, no I/O.
//!
//! Keys are kept only as a 64-bit hash: the table never holds a raw key, and logs show a short
//! fingerprint of the hash.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};

use base64::Engine as _;
use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::tmdb::{API_KEY_PARAM, BEARER_PREFIX};

/// A hashed API key: the identity of one bucket.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(u64);

impl Key {
    /// The bucket of the budget shared by all keys (`global_requests_per_second`). A real key
    /// hashing to exactly this value has a 1 in 2^64 chance.
    pub const GLOBAL: Key = Key(0);

    /// Hashes a credential (a v3 API key, or a bearer token without a usable `aud`).
    ///
    /// The hash is fixed (not per process) so fingerprints in logs stay comparable across restarts.
    pub fn from_credential(credential: &str) -> Self {
        #[allow(deprecated)]
        // SipHash-2-4 with fixed keys: stable across runs, no extra dependency.
        let mut hasher =
            std::hash::SipHasher::new_with_keys(0x746d_6462_2d70_726f, 0x7879_2d6b_6579_7321);
        credential.hash(&mut hasher);
        Self(hasher.finish())
    }

    /// The key a configured credential (an alias or override value) stands for: a v4 read token
    /// counts as its `aud` key, exactly as a request carrying it would.
    pub fn of_configured(credential: &str) -> Self {
        match jwt_audience(credential) {
            Some(aud) => Self::from_credential(&aud),
            None => Self::from_credential(credential),
        }
    }

    /// A short, non-reversible label for logs.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint((self.0 >> 32) as u32)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

/// The top 32 bits of a key's hash, printed as 8 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(u32);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where a request's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `api_key` query parameter.
    Query,
    /// An `Authorization: Bearer` token.
    Bearer,
    /// None on the request: the configured default key, to be injected upstream.
    Default,
}

/// A request's key and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub key: Key,
    pub source: Source,
}

/// Identifies the key of a request from its query and headers. `default` is the hash of the
/// configured default key, if any. `None`: the request carries no key and there is no default.
pub fn identify(
    query: Option<&str>,
    headers: &HeaderMap,
    default: Option<Key>,
) -> Option<Identity> {
    if let Some(api_key) = query.and_then(api_key_param) {
        return Some(Identity {
            key: Key::from_credential(&api_key),
            source: Source::Query,
        });
    }
    if let Some(token) = bearer_token(headers) {
        let key = match jwt_audience(token) {
            Some(aud) => Key::from_credential(&aud),
            None => Key::from_credential(token),
        };
        return Some(Identity {
            key,
            source: Source::Bearer,
        });
    }
    default.map(|key| Identity {
        key,
        source: Source::Default,
    })
}

/// The first non-empty `api_key` value of a query string, percent-decoded. Empty pairs
/// (`a=1&&b=2`) and valueless parameters are tolerated.
pub fn api_key_param(query: &str) -> Option<Cow<'_, str>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, value)| name == API_KEY_PARAM && !value.trim().is_empty())
        .map(|(_, value)| value)
}

/// Whether a query names two or more different non-empty `api_key` values.
pub fn has_conflicting_api_keys(query: &str) -> bool {
    let mut keys = form_urlencoded::parse(query.as_bytes())
        .filter(|(name, value)| name == API_KEY_PARAM && !value.trim().is_empty())
        .map(|(_, value)| value);
    match keys.next() {
        Some(first) => keys.any(|other| other != first),
        None => false,
    }
}

/// The token of an `Authorization: Bearer <token>` header, if well-formed.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let scheme = value.get(..BEARER_PREFIX.len())?;
    if !scheme.eq_ignore_ascii_case(BEARER_PREFIX) {
        return None;
    }
    let token = value[BEARER_PREFIX.len()..].trim();
    (!token.is_empty()).then_some(token)
}

/// The `aud` claim of a JWT's payload, read without checking the signature (TMDB checks it; the
/// proxy only needs to know whose budget the token spends).
pub fn jwt_audience(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 8 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match claims.get("aud")? {
        serde_json::Value::String(aud) if !aud.trim().is_empty() => Some(aud.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn jwt(payload: &str) -> String {
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            enc.encode(r#"{"alg":"HS256"}"#),
            enc.encode(payload),
            enc.encode("sig")
        )
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[test]
    fn query_key_wins_and_tolerates_empty_pairs() {
        let id = identify(Some("api_key=K1&&language=en-US"), &bearer("T"), None).unwrap();
        assert_eq!(
            id,
            Identity {
                key: Key::from_credential("K1"),
                source: Source::Query
            }
        );
        assert_eq!(
            api_key_param("&&api_key=&api_key=K2&").as_deref(),
            Some("K2")
        );
        assert_eq!(
            api_key_param("language=en&include_image_language=null"),
            None
        );
    }

    #[test]
    fn conflicting_keys_are_spotted() {
        assert!(has_conflicting_api_keys("api_key=A&api_key=B"));
        assert!(!has_conflicting_api_keys("api_key=A&api_key=A&api_key="));
        assert!(!has_conflicting_api_keys("page=1"));
    }

    #[test]
    fn bearer_jwt_shares_the_audience_key_bucket() {
        let token = jwt(r#"{"aud":"K1","sub":"x","scopes":["api_read"],"version":1}"#);
        let id = identify(None, &bearer(&token), None).unwrap();
        assert_eq!(id.key, Key::from_credential("K1"));
        assert_eq!(id.source, Source::Bearer);
    }

    #[test]
    fn a_configured_read_token_stands_for_its_audience_key() {
        let token = jwt(r#"{"aud":"K1"}"#);
        assert_eq!(Key::of_configured(&token), Key::from_credential("K1"));
        assert_eq!(Key::of_configured("K2"), Key::from_credential("K2"));
    }

    #[test]
    fn opaque_bearer_is_its_own_key() {
        let id = identify(None, &bearer("not-a-jwt"), None).unwrap();
        assert_eq!(id.key, Key::from_credential("not-a-jwt"));
        assert_eq!(jwt_audience(&jwt(r#"{"aud":["a","b"]}"#)), None);
        assert_eq!(jwt_audience("a.!!!.c"), None);
    }

    #[test]
    fn default_then_none() {
        let d = Key::from_credential("D");
        assert_eq!(
            identify(Some("page=1"), &HeaderMap::new(), Some(d))
                .unwrap()
                .source,
            Source::Default
        );
        assert_eq!(identify(None, &HeaderMap::new(), None), None);
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(identify(None, &basic, None), None);
    }

    #[test]
    fn fingerprint_does_not_contain_the_key() {
        let k = "0123456789abcdef0123456789abcdef";
        let shown = format!(
            "{:?} {}",
            Key::from_credential(k),
            Key::from_credential(k).fingerprint()
        );
        assert!(!shown.contains(k) && !shown.contains("01234567"));
    }
}
