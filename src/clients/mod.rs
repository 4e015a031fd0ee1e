//! Apps sharing the proxy's keys (`[clients]`): which app a request comes from (its token), the
//! key it is charged to and sent with, and, in [`fair`], how a saturated key's tokens are shared
//! between its apps.
//!
//! An app presents its token as `X-Proxy-Token: TOKEN` or `Proxy-Authorization: Bearer TOKEN`.
//! The proxy holds only each token's SHA-256 and compares the digest of what a request presents
//! with every app's, in constant time and without stopping at a match, so neither the token nor
//! which app it belongs to shows in the time an answer takes. Both headers are removed before a
//! request goes upstream, whatever the outcome.

pub mod fair;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, PROXY_AUTHORIZATION};
use subtle::ConstantTimeEq;

use crate::config::{ClientsConfig, Secret, sha256};
use crate::error::ProxyError;
use crate::limiter::Key;
use crate::tmdb::auth;

pub use fair::Lane;

/// The header an app presents its token in.
pub const X_PROXY_TOKEN: HeaderName = HeaderName::from_static("x-proxy-token");

/// One app, as requests see it.
pub struct App {
    /// Metric and log label (bounded by the configuration, never a token).
    pub name: Arc<str>,
    /// What the app's requests are sent with: a v3 key, or a v4 read token.
    pub credential: Secret,
    /// Sent as `Authorization: Bearer` (a v4 token) rather than `api_key`.
    pub bearer: bool,
    /// The budget the app's requests spend.
    pub key: Key,
    /// The key's lane, and the app's place in it.
    pub lane: Arc<Lane>,
    pub index: usize,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The configured apps, rebuilt on every reload.
#[derive(Debug, Default)]
pub struct Apps {
    apps: Vec<Arc<App>>,
    /// Each accepted token digest, and whose it is.
    digests: Vec<([u8; 32], usize)>,
    require_token: bool,
}

impl Apps {
    /// The apps of `cfg`; `window` is the one-second window with its margin (caps and shares
    /// are counted over it).
    pub fn new(cfg: &ClientsConfig, window: Duration) -> Self {
        let mut lanes: HashMap<Key, Vec<usize>> = HashMap::new();
        let keys: Vec<Key> = cfg
            .apps
            .iter()
            .map(|app| crate::proxy::ctx::budget_key(app.credential.expose()))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            lanes.entry(*key).or_default().push(i);
        }
        let mut built: HashMap<Key, Arc<Lane>> = HashMap::new();
        for (key, members) in &lanes {
            let members = members
                .iter()
                .map(|&i| {
                    let app = &cfg.apps[i];
                    fair::Member {
                        share: app.share.get(),
                        priority: app.priority,
                        cap: app.requests_per_second.map(|rps| rps.get()),
                    }
                })
                .collect();
            built.insert(*key, Arc::new(Lane::new(*key, members, window)));
        }
        let apps = cfg
            .apps
            .iter()
            .enumerate()
            .map(|(i, app)| {
                let key = keys[i];
                let index = lanes[&key].iter().position(|&j| j == i).unwrap_or(0);
                Arc::new(App {
                    name: Arc::from(app.name.as_str()),
                    credential: app.credential.clone(),
                    bearer: auth::jwt_audience(app.credential.expose()).is_some(),
                    key,
                    lane: built[&key].clone(),
                    index,
                })
            })
            .collect();
        let digests = cfg
            .apps
            .iter()
            .enumerate()
            .flat_map(|(i, app)| app.token_sha256.iter().map(move |d| (*d, i)))
            .collect();
        Self {
            apps,
            digests,
            require_token: cfg.require_token,
        }
    }

    /// Every configured app, in the order of `[[clients.apps]]`.
    pub fn all(&self) -> &[Arc<App>] {
        &self.apps
    }

    /// The app whose token the request presents, with both token headers removed. Without a
    /// token: `None`, or 401 code 3 when `require_token` is on. An unknown or malformed token is
    /// always 401 code 3. With no apps configured, tokens are removed and otherwise ignored.
    pub fn identify(&self, headers: &mut HeaderMap) -> Result<Option<Arc<App>>, ProxyError> {
        let presented = presented(headers);
        headers.remove(X_PROXY_TOKEN);
        headers.remove(PROXY_AUTHORIZATION);
        if self.apps.is_empty() {
            return Ok(None);
        }
        match presented {
            Presented::Token(digest) => self
                .find(&digest)
                .map(|i| Some(self.apps[i].clone()))
                .ok_or(ProxyError::InvalidToken),
            Presented::Malformed => Err(ProxyError::InvalidToken),
            Presented::None if self.require_token => Err(ProxyError::InvalidToken),
            Presented::None => Ok(None),
        }
    }

    /// The app with this token digest: every digest is compared, each in constant time.
    fn find(&self, digest: &[u8; 32]) -> Option<usize> {
        let mut found = None;
        for (known, app) in &self.digests {
            if bool::from(known.ct_eq(digest)) {
                found = Some(*app);
            }
        }
        found
    }
}

/// What a request presents, its token already hashed (the token itself goes no further).
enum Presented {
    None,
    Token([u8; 32]),
    /// Two tokens, an empty one, or a `Proxy-Authorization` that is not `Bearer`.
    Malformed,
}

fn presented(headers: &HeaderMap) -> Presented {
    let mut tokens = headers.get_all(X_PROXY_TOKEN).iter().map(|v| {
        let token = v.as_bytes().trim_ascii();
        (!token.is_empty()).then_some(token)
    });
    let mut bearers = headers.get_all(PROXY_AUTHORIZATION).iter().map(|v| {
        let value = v.as_bytes();
        let prefix = auth::BEARER_PREFIX.as_bytes();
        let token = value
            .get(..prefix.len())
            .filter(|scheme| scheme.eq_ignore_ascii_case(prefix))
            .map(|_| value[prefix.len()..].trim_ascii());
        token.filter(|t| !t.is_empty())
    });
    let (first, second) = (tokens.next(), bearers.next());
    if tokens.next().is_some() || bearers.next().is_some() {
        return Presented::Malformed;
    }
    match (first, second) {
        (None, None) => Presented::None,
        (Some(Some(token)), None) | (None, Some(Some(token))) => Presented::Token(sha256(token)),
        // The same token in both headers is one token.
        (Some(Some(a)), Some(Some(b))) if a == b => Presented::Token(sha256(a)),
        _ => Presented::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn apps(toml: &str) -> Apps {
        let cfg = Config::from_toml_str(toml).expect("valid");
        Apps::new(&cfg.clients, Duration::from_millis(1050))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    const TWO: &str = "[[clients.apps]]\nname = \"web\"\ntoken = \"web-secret\"\napi_key = \"K1\"\n\
        [[clients.apps]]\nname = \"scraper\"\ntoken_sha256 = [\"0000000000000000000000000000000000000000000000000000000000000000\", \"5d5a6b7f3c0e1b9e5c8a2c7c0f8d1c2b3a4e5f60718293a4b5c6d7e8f9012345\"]\ntoken = \"scrape\"\napi_key = \"K1\"\npriority = \"batch\"\n";

    #[test]
    fn a_token_names_its_app_in_either_header_and_both_headers_go() {
        let apps = apps(TWO);
        let mut h = headers(&[("x-proxy-token", "web-secret")]);
        assert_eq!(&*apps.identify(&mut h).unwrap().unwrap().name, "web");
        assert!(h.is_empty());
        let mut h = headers(&[("proxy-authorization", "bearer scrape")]);
        let app = apps.identify(&mut h).unwrap().unwrap();
        assert_eq!((&*app.name, app.index), ("scraper", 1));
        assert!(h.is_empty());
        let mut h = headers(&[
            ("x-proxy-token", "scrape"),
            ("proxy-authorization", "Bearer scrape"),
        ]);
        assert_eq!(&*apps.identify(&mut h).unwrap().unwrap().name, "scraper");
    }

    #[test]
    fn unknown_malformed_or_doubled_tokens_are_refused() {
        let apps = apps(TWO);
        for pairs in [
            &[("x-proxy-token", "nope")][..],
            &[("x-proxy-token", "")],
            &[("proxy-authorization", "Basic d2ViOnNlY3JldA==")],
            &[("x-proxy-token", "web-secret"), ("x-proxy-token", "scrape")],
            &[
                ("x-proxy-token", "web-secret"),
                ("proxy-authorization", "Bearer scrape"),
            ],
        ] {
            let mut h = headers(pairs);
            assert!(
                matches!(apps.identify(&mut h), Err(ProxyError::InvalidToken)),
                "{pairs:?}"
            );
            assert!(h.is_empty(), "removed even when refused");
        }
        assert!(apps.identify(&mut HeaderMap::new()).unwrap().is_none());
        let required = self::apps(&format!("[clients]\nrequire_token = true\n{TWO}"));
        assert!(matches!(
            required.identify(&mut HeaderMap::new()),
            Err(ProxyError::InvalidToken)
        ));
    }

    #[test]
    fn apps_of_one_key_share_a_lane_and_no_apps_means_tokens_are_ignored() {
        let apps = apps(TWO);
        assert!(Arc::ptr_eq(&apps.apps[0].lane, &apps.apps[1].lane));
        let none = self::apps("");
        let mut h = headers(&[("x-proxy-token", "whatever")]);
        assert!(none.identify(&mut h).unwrap().is_none());
        assert!(h.is_empty());
    }
}
