//! TMDB's auth scheme: which credential a request presents and whose budget it spends.
//!
//! A request authenticates with its `api_key` query parameter (v3) or, failing that, an
//! `Authorization: Bearer` token (a v4 read access token). A TMDB read token is a JWT whose
//! payload's `aud` claim is the account's v3 key, so such a token spends that key's budget and one
//! account's v3 and v4 traffic share one limit. Pure functions, no I/O.

use std::borrow::Cow;

use base64::Engine as _;
use http::HeaderMap;
use http::header::AUTHORIZATION;

use super::query::Query;

/// Query parameter carrying a v3 API key.
pub const API_KEY_PARAM: &str = "api_key";

/// Scheme of a v4 read access token in `Authorization`.
pub const BEARER_PREFIX: &str = "Bearer ";

/// Longest JWT payload decoded, base64 included: TMDB's are a few hundred bytes.
const MAX_JWT_PAYLOAD: usize = 8 * 1024;

/// The credential a request presents. Its `Debug` names the kind only: the value is a secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// A v3 key, from the `api_key` query parameter (decoded).
    ApiKey(&'a str),
    /// A token from `Authorization: Bearer`.
    Bearer(&'a str),
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ApiKey(_) => "Credential::ApiKey(<redacted>)",
            Self::Bearer(_) => "Credential::Bearer(<redacted>)",
        })
    }
}

impl<'a> Credential<'a> {
    /// The credential as the client sent it.
    pub fn as_sent(&self) -> &'a str {
        match *self {
            Self::ApiKey(key) | Self::Bearer(key) => key,
        }
    }

    /// The account whose budget this credential spends: a v3 key is its own account, whatever it
    /// looks like; a bearer token that is a read token is its `aud` key's; any other bearer token
    /// is its own.
    pub fn account(&self) -> Cow<'a, str> {
        match *self {
            Self::ApiKey(key) => Cow::Borrowed(key),
            Self::Bearer(token) => account_of(token),
        }
    }
}

/// The request's credential: its first non-empty `api_key` value, else its bearer token.
pub fn credential<'a>(query: &'a Query<'_>, headers: &'a HeaderMap) -> Option<Credential<'a>> {
    if let Some(key) = query.values(API_KEY_PARAM).next() {
        return Some(Credential::ApiKey(key));
    }
    bearer_token(headers).map(Credential::Bearer)
}

/// Whether a request's credentials are ambiguous: the proxy would charge one account while the
/// upstream might honour another, a way around the limit. That is two different `api_key`
/// values; an `api_key` hidden behind a `;` (`x=1;api_key=K`, which some servers split on); more
/// than one `Authorization` header; or a query key and a bearer token of different accounts.
pub fn is_ambiguous(query: &Query<'_>, headers: &HeaderMap) -> bool {
    let mut keys = query.values(API_KEY_PARAM);
    let first = keys.next();
    if first.is_some_and(|first| keys.any(|other| other != first)) {
        return true;
    }
    let hidden = query.pairs().iter().any(|pair| {
        pair.raw.split(';').skip(1).any(|part| {
            form_urlencoded::parse(part.as_bytes())
                .next()
                .is_some_and(|(name, _)| name == API_KEY_PARAM)
        })
    });
    if hidden || headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return true;
    }
    match (first, bearer_token(headers)) {
        (Some(key), Some(token)) => account_of(token) != key,
        _ => false,
    }
}

/// The account a configured credential (an alias or override value) stands for, exactly as a
/// request carrying it would: a read token counts as its `aud` key.
pub fn account_of(credential: &str) -> Cow<'_, str> {
    match jwt_audience(credential) {
        Some(aud) => Cow::Owned(aud),
        None => Cow::Borrowed(credential),
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

/// A JWT's claims, read without checking the signature (TMDB checks it; the proxy only needs
/// to know whose budget the token spends, and whether it is more than a read token).
fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_JWT_PAYLOAD {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether a bearer token may do more than read: a JWT whose `scopes` name anything but
/// `api_read` (a user's access token). A token that is no JWT is taken as a read token.
pub fn may_write(token: &str) -> bool {
    let Some(claims) = jwt_claims(token) else {
        return false;
    };
    match claims.get("scopes") {
        Some(serde_json::Value::Array(scopes)) => {
            scopes.iter().any(|s| s.as_str() != Some("api_read"))
        }
        Some(_) => true,
        None => claims.get("sub").is_some() && claims.get("aud").is_none(),
    }
}

/// The `aud` claim of a JWT's payload (see [`jwt_claims`]).
pub fn jwt_audience(token: &str) -> Option<String> {
    let claims = jwt_claims(token)?;
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
        let query = Query::parse(Some("api_key=K1&&language=en-US"));
        assert_eq!(
            credential(&query, &bearer("T")),
            Some(Credential::ApiKey("K1"))
        );
        let query = Query::parse(Some("&&api_key=&api_key=K2&"));
        assert_eq!(
            credential(&query, &HeaderMap::new()),
            Some(Credential::ApiKey("K2"))
        );
        let query = Query::parse(Some("language=en&include_image_language=null"));
        assert_eq!(credential(&query, &HeaderMap::new()), None);
    }

    #[test]
    fn ambiguous_credentials_are_spotted() {
        let none = HeaderMap::new();
        let ambiguous = |q, headers: &HeaderMap| is_ambiguous(&Query::parse(Some(q)), headers);
        assert!(ambiguous("api_key=A&api_key=B", &none));
        assert!(!ambiguous("api_key=A&api_key=A&api_key=", &none));
        assert!(!ambiguous("page=1", &none));
        // A key behind a `;`, which a server splitting on it would read as another parameter.
        assert!(ambiguous("x=1;api_key=B", &none));
        assert!(ambiguous("api_key=A;api_key=B", &none));
        assert!(!ambiguous("query=a;b", &none));
        // A query key and a token of another account; the same account is not ambiguous.
        let token = jwt(r#"{"aud":"A"}"#);
        assert!(!ambiguous("api_key=A", &bearer(&token)));
        assert!(ambiguous("api_key=DECOY", &bearer(&token)));
        assert!(ambiguous("api_key=DECOY", &bearer("opaque")));
        assert!(!ambiguous("page=1", &bearer("opaque")));
        // Two Authorization headers.
        let mut two = bearer("one");
        two.append(AUTHORIZATION, HeaderValue::from_static("Bearer two"));
        assert!(ambiguous("page=1", &two));
    }

    #[test]
    fn a_read_token_spends_its_audience_keys_budget() {
        let token = jwt(r#"{"aud":"K1","sub":"x","scopes":["api_read"],"version":1}"#);
        let (headers, query) = (bearer(&token), Query::default());
        let found = credential(&query, &headers).unwrap();
        assert_eq!(found, Credential::Bearer(&token));
        assert_eq!(found.account(), "K1");
        assert!(!format!("{found:?}").contains(&token));
        // A query key is its own account, even one that looks like a read token.
        let query = format!("api_key={token}");
        let query = Query::parse(Some(&query));
        let none = HeaderMap::new();
        let as_key = credential(&query, &none).unwrap();
        assert_eq!(as_key.account(), token.as_str());
        assert_eq!(account_of(&token), "K1");
        assert_eq!(account_of("K2"), "K2");
    }

    #[test]
    fn an_opaque_bearer_is_its_own_account() {
        let (headers, query) = (bearer("not-a-jwt"), Query::default());
        let found = credential(&query, &headers).unwrap();
        assert_eq!(found.account(), "not-a-jwt");
        assert_eq!(jwt_audience(&jwt(r#"{"aud":["a","b"]}"#)), None);
        assert_eq!(jwt_audience("a.!!!.c"), None);
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&basic), None);
    }
}
