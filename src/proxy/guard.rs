//! Who may spend the key the proxy injects.
//!
//! With `keys.default_api_key` set, a request without a key of its own spends the operator's. Any
//! web page a browser on the same host or network loads could then call the proxy: a cross-origin
//! page, or a DNS-rebinding one (its own name resolving to 127.0.0.1, so not even cross-origin).
//! So a request that would spend the injected key must name the proxy by one of its own names in
//! `Host` (`server.allowed_hosts`; by default, on a loopback listener, `localhost` and the loopback
//! addresses), and a browser's request must come from a listed origin (`server.cors_origins`).
//! Answers that spend the injected key name their origin in `Access-Control-Allow-Origin`, never
//! `*`. Requests carrying their own key are not concerned: CORS stays as TMDB does it.

use std::net::IpAddr;

use http::header::{HOST, ORIGIN};
use http::request::Parts;
use http::{HeaderMap, HeaderValue};

use crate::config::ServerConfig;
use crate::error::ProxyError;

/// Which `Host` values name the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hosts {
    /// Any: the listener is not on loopback and no list is set.
    Any,
    /// `localhost` and the loopback addresses, on any port.
    Loopback,
    /// These names, each `host` (any port) or `host:port`.
    Listed(Vec<String>),
}

/// The guard of the injected key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    hosts: Hosts,
    origins: Vec<String>,
}

/// The `Access-Control-Allow-Origin` an answer carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Cors {
    /// `*`, as TMDB's API does.
    #[default]
    Any,
    /// This origin only (`Vary: Origin` with it).
    Origin(HeaderValue),
    /// None: no page may read the answer.
    Closed,
}

impl Guard {
    /// The guard for `cfg`'s listener and lists.
    pub fn new(cfg: &ServerConfig) -> Self {
        let hosts = match (cfg.allowed_hosts.is_empty(), cfg.listen.ip().is_loopback()) {
            (false, _) => Hosts::Listed(cfg.allowed_hosts.clone()),
            (true, true) => Hosts::Loopback,
            (true, false) => Hosts::Any,
        };
        Self {
            hosts,
            origins: cfg.cors_origins.clone(),
        }
    }

    /// Checks a request that would spend the injected key: 400 code 47 for a `Host` that is not
    /// one of the proxy's names, 401 code 3 for a page of an origin not listed.
    pub fn admit(&self, parts: &Parts) -> Result<(), ProxyError> {
        let host = parts
            .headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        if let Some(host) = host
            && !self.names(host)
        {
            return Err(ProxyError::HostNotAllowed);
        }
        match self.cors(&parts.headers) {
            Cors::Closed => Err(ProxyError::OriginNotAllowed),
            _ => Ok(()),
        }
    }

    /// The CORS answer for a request (or preflight) from its `Origin`: that origin when listed,
    /// closed when not; a request without `Origin` is no browser's cross-origin request.
    pub fn cors(&self, headers: &HeaderMap) -> Cors {
        let Some(origin) = headers.get(ORIGIN) else {
            return Cors::Any;
        };
        let listed = origin.to_str().is_ok_and(|origin| {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            self.origins
                .iter()
                .any(|allowed| allowed == "*" || *allowed == origin)
        });
        match listed {
            true => Cors::Origin(origin.clone()),
            false => Cors::Closed,
        }
    }

    /// Whether `host` (a `Host` value, `name[:port]`) is one of the proxy's names.
    fn names(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host
                .rsplit_once(':')
                .map_or(host.as_str(), |(name, _)| name),
        };
        match &self.hosts {
            Hosts::Any => true,
            Hosts::Loopback => {
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            Hosts::Listed(names) => names
                .iter()
                .any(|listed| *listed == host || *listed == name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http::Request;

    fn guard(toml: &str) -> Guard {
        Guard::new(&Config::from_toml_str(toml).unwrap().server)
    }

    fn parts(host: &str, origin: Option<&str>) -> Parts {
        let mut req = Request::get("/3/movie/1").header(HOST, host);
        if let Some(origin) = origin {
            req = req.header(ORIGIN, origin);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn on_loopback_only_loopback_names_may_spend_the_key() {
        let g = guard("");
        for ok in [
            "localhost:8080",
            "127.0.0.1:9",
            "[::1]:8080",
            "LOCALHOST",
            "127.0.0.2",
        ] {
            assert!(g.admit(&parts(ok, None)).is_ok(), "{ok}");
        }
        for rebound in ["evil.example:8080", "evil.example", "10.0.0.1:8080"] {
            assert!(
                matches!(
                    g.admit(&parts(rebound, None)),
                    Err(ProxyError::HostNotAllowed)
                ),
                "{rebound}"
            );
        }
    }

    #[test]
    fn listed_names_and_origins() {
        let g = guard(
            "[server]\nlisten = \"0.0.0.0:8080\"\nallowed_hosts = [\"tmdb-proxy\", \"proxy.internal:8080\"]\n\
             cors_origins = [\"https://app.example\"]\n",
        );
        assert!(g.admit(&parts("tmdb-proxy:8080", None)).is_ok());
        assert!(g.admit(&parts("proxy.internal:8080", None)).is_ok());
        assert!(g.admit(&parts("proxy.internal:9090", None)).is_err());
        let app = parts("tmdb-proxy", Some("https://app.example"));
        assert!(g.admit(&app).is_ok());
        assert_eq!(
            g.cors(&app.headers),
            Cors::Origin(HeaderValue::from_static("https://app.example"))
        );
        assert!(matches!(
            g.admit(&parts("tmdb-proxy", Some("https://evil.example"))),
            Err(ProxyError::OriginNotAllowed)
        ));
        // Off loopback without a list, any name will do.
        assert!(
            guard("[server]\nlisten = \"0.0.0.0:8080\"\n")
                .admit(&parts("anything", None))
                .is_ok()
        );
    }
}
