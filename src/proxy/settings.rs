//! The reloadable part of the proxy: what a request reads once, at its start, and a reload
//! replaces whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::cache::Cache;
use crate::clients::Apps;
use crate::config::{Config, Secret, UpstreamConfig};
use crate::limiter::Key;
use crate::upstream::{BuildError, Dialer, Upstream};

use super::body::Delivery;
use super::ctx::budget_key;
use super::guard::Guard;
use super::phases::RequestRules;

/// Settings in force for the requests that start now.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) upstream: Upstream,
    /// The configuration `upstream` was built from, to rebuild it only when it changed.
    upstream_cfg: UpstreamConfig,
    pub(super) rules: RequestRules,
    /// Longest a request may queue for a token (zero in reject mode).
    pub(super) max_wait: Duration,
    pub(super) legacy_headers: bool,
    /// How upstream bodies are held for their clients.
    pub(super) delivery: Delivery,
    /// Most bytes of a request's headers.
    pub(super) max_header_bytes: usize,
    /// Most bytes of a request body, and how long after its headers it may take to arrive.
    pub(super) max_request_body: usize,
    pub(super) body_timeout: Duration,
    /// The key injected into requests that carry none.
    pub(super) default_key: Option<Secret>,
    /// Who may spend it (set only when there is one).
    pub(super) guard: Option<Guard>,
    /// Alias of each key named in `[keys.aliases]`: the only per-key metric label.
    pub(super) aliases: HashMap<Key, Arc<str>>,
    /// The response cache (kept across reloads that leave `[cache]` alone).
    pub(super) cache: Option<Arc<Cache>>,
    /// Apps and their tokens (`[clients]`).
    pub(super) apps: Apps,
}

impl Settings {
    /// Settings for `cfg`, reusing `current`'s upstream pool when its connection settings are
    /// unchanged. `dialer` replaces the network (tests on paused time).
    pub(super) fn new(
        cfg: &Config,
        current: Option<&Settings>,
        broken_bodies: &Arc<AtomicU64>,
        dialer: Option<&Dialer>,
    ) -> Result<Self, BuildError> {
        let upstream = match (current, dialer) {
            (Some(current), _) if current.upstream_cfg.connects_like(&cfg.upstream) => {
                current.upstream.clone()
            }
            (_, Some(dial)) => {
                Upstream::in_memory(&cfg.upstream, dial.clone(), broken_bodies.clone())
            }
            (_, None) => Upstream::new(&cfg.upstream, broken_bodies.clone())?,
        };
        let default_key = cfg.keys.default_api_key.clone();
        let rules = RequestRules {
            upstream: upstream.base().clone(),
            // Injected as `api_key`, so it spends its own budget, as a client's v3 key does.
            default_key: default_key.as_ref().map(|secret| Key::of(secret.expose())),
            paths: cfg.upstream.paths.clone(),
            savers: cfg.quota_savers,
        };
        let aliases = cfg
            .keys
            .aliases
            .iter()
            .map(|(alias, secret)| (budget_key(secret.expose()), Arc::from(alias.as_str())))
            .collect();
        Ok(Self {
            upstream,
            upstream_cfg: cfg.upstream.clone(),
            rules,
            max_wait: cfg.limit.max_wait,
            legacy_headers: cfg.limit.legacy_headers,
            max_header_bytes: cfg.server.max_header_bytes,
            max_request_body: cfg.server.max_request_body,
            body_timeout: cfg.server.header_read_timeout,
            delivery: Delivery {
                max_buffered: cfg.upstream.max_buffered_body,
                min_rate: cfg.upstream.min_delivery_rate,
                frame_timeout: cfg.upstream.request_timeout,
            },
            guard: default_key.as_ref().map(|_| Guard::new(&cfg.server)),
            default_key,
            aliases,
            apps: Apps::new(
                &cfg.clients,
                Duration::from_secs(1) + cfg.limit.window_margin,
            ),
            cache: match current.and_then(|c| c.cache.as_ref()) {
                _ if !cfg.cache.enabled => None,
                Some(cache) if cache.config() == &cfg.cache => Some(cache.clone()),
                _ => Some(Cache::new(&cfg.cache)),
            },
        })
    }

    /// The metric label of `key`, if an operator gave it an alias.
    pub(super) fn alias(&self, key: Option<Key>) -> Option<&str> {
        key.and_then(|key| self.aliases.get(&key))
            .map(|alias| &**alias)
    }
}
