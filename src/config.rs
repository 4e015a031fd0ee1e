//! Configuration: the TOML file, layered with `TMDB_PROXY__SECTION__KEY` environment overrides,
//! validated once into typed sections.
//!
//! This is the only module that reads files or the environment. It follows a
//! `toml → Raw* (serde) → validated` pipeline: the `Raw*` structs mirror the file and reject unknown
//! keys, and [`Config`] holds only states that make sense (non-zero counts, parsed addresses and
//! durations), so the rest of the crate never re-checks them. Every error names the offending key and
//! what a valid value looks like.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

pub use crate::tmdb::rules::QuotaSavers;

/// Default client listener address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default upstream: TMDB's public API host.
pub const DEFAULT_BASE_URL: &str = "https://api.themoviedb.org";
/// Default time allowed to open a TCP connection and finish the TLS handshake upstream: 2 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time allowed for the upstream's response headers once the request is sent: 10 s.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on open upstream connections. TMDB's edge allows about 20 per client IP.
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: u32 = 20;
/// Default time an idle pooled upstream connection is kept: 30 s.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default per-key ceiling, requests per second. TMDB's documented limit is 50/s.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 50;
/// Default longest time a request may wait for a token in `queue` mode: 2 s.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(2);
/// Default safety margin added to the one-second window, covering scheduling and network jitter
/// between the proxy's admission and the upstream's arrival clock: 50 ms.
pub const DEFAULT_WINDOW_MARGIN: Duration = Duration::from_millis(50);
/// Default period of the sweep that drops buckets of idle keys: 1 s (a bucket is idle one window
/// after its last request, so a flood of one-off keys never holds more than ~2 s of them).
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Default cap on keys with a bucket in memory; a new key beyond it gets 429 (code 25).
pub const DEFAULT_MAX_KEYS: u32 = 100_000;
/// Default time allowed for a client to send its request headers: 30 s.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client connection may sit idle (no bytes, no request in progress): 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on concurrent client connections.
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: u32 = 10_000;
/// Default cap on concurrent HTTP/2 streams per client connection: 128, as nginx's (hyper's own is
/// 200). Each stream may hold a response buffered in memory.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 128;
/// Default most bytes of a request's headers (request line included): 32 KiB. TMDB requests carry a
/// few hundred; more gets 431 (code 47).
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 32 * 1024;
/// Default most bytes of a request body: 1 MiB. TMDB's write endpoints take small JSON bodies; more
/// gets 413 (code 47), whether its length is declared or it is chunked.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// Default most bytes of one upstream response body held in memory for a client that reads
/// slower than the upstream sends: 8 MiB (TMDB's JSON is far smaller). Within it, the upstream
/// connection is free as soon as the upstream is done.
pub const DEFAULT_MAX_BUFFERED_BODY: u64 = 8 * 1024 * 1024;
/// Default slowest a client may read a response whose body does not fit the buffer, in bytes per
/// second: 64 KiB/s. Below it the upstream connection is closed and the response ends.
pub const DEFAULT_MIN_DELIVERY_RATE: u64 = 64 * 1024;
/// Default grace period for in-flight requests at shutdown: 10 s.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default log filter (overridden by `RUST_LOG` when that is set).
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default admin listener (health, readiness, metrics): loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default path prefixes forwarded upstream: TMDB's v3 and v4 APIs.
pub const DEFAULT_PATHS: [&str; 2] = ["/3/", "/4/"];
/// Prefix of environment overrides: `TMDB_PROXY__SECTION__KEY`.
pub const ENV_PREFIX: &str = "TMDB_PROXY";
/// Prefix of every Redis key of the shared budget.
pub const DEFAULT_NAMESPACE: &str = "tmdb-proxy";
/// Longest wait for one Redis call of the shared budget.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(25);
/// The longest `cluster.call_timeout` allowed: a request never waits longer on Redis.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Highest accepted `requests_per_second`; beyond this the proxy is the bottleneck anyway.
const MAX_REQUESTS_PER_SECOND: u32 = 1_000_000;
/// Longest accepted `max_wait`: a client holding a connection longer than this is better told 429.
const MAX_MAX_WAIT: Duration = Duration::from_secs(60);
/// Longest accepted window margin; larger margins cost more than 10% of the admitted rate.
const MAX_WINDOW_MARGIN: Duration = Duration::from_millis(500);
/// Shortest accepted window margin: half of it is the stamp tolerance and 1 ms is clock skew
/// between concurrent requests, so below this nothing is left for network jitter.
const MIN_WINDOW_MARGIN: Duration = Duration::from_millis(10);

/// A configuration that failed to load or validate. The message names the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An error in the file at `path`.
    #[error("{}: {error}", path.display())]
    In {
        path: PathBuf,
        error: Box<ConfigError>,
    },
    /// The file is not valid TOML. Only the position is reported, never the text: the line may
    /// hold a secret.
    #[error("invalid config: line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// The TOML (or an environment override) does not fit the schema. The message names the key
    /// and what was expected, never the value given.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value parsed but is not acceptable.
    #[error("invalid config: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// What the `config` crate reports about `text`, without any value from the file or the
/// environment: a key pasted into the wrong field, or a line that does not parse, must not reach a
/// terminal or a log through the error meant to help fix it.
fn describe(error: config::ConfigError, text: &str) -> ConfigError {
    use config::ConfigError as E;
    match error {
        E::FileParse { cause, .. } => match cause.downcast_ref::<toml::de::Error>() {
            Some(parse) => {
                let at = parse.span().map_or(0, |span| span.start);
                let before = text.get(..at).unwrap_or(text);
                ConfigError::Syntax {
                    line: before.matches('\n').count() + 1,
                    column: before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
                    message: scrub(parse.message()),
                }
            }
            None => ConfigError::Parse("the file is not valid TOML".to_owned()),
        },
        E::Type {
            unexpected,
            expected,
            key,
            ..
        } => {
            // Its display is the kind, then the value (`string "..."`, `integer `5``): keep the kind.
            let shown = unexpected.to_string();
            let found = shown.split(' ').next().unwrap_or("value");
            let key = key.map(|key| format!("`{key}`: ")).unwrap_or_default();
            ConfigError::Parse(format!("{key}expected {expected}, found a {found}"))
        }
        E::At { error, key, .. } => match (describe(*error, text), key) {
            (ConfigError::Parse(message), Some(key)) => {
                ConfigError::Parse(format!("`{key}`: {message}"))
            }
            (described, _) => described,
        },
        other => ConfigError::Parse(scrub(&other.to_string())),
    }
}

/// `message` with every value serde quotes (`string "..."`) replaced by what kind it was.
fn scrub(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(QUOTED) {
        out.push_str(&rest[..start]);
        out.push_str("a string");
        let value = &rest[start + QUOTED.len()..];
        // The value is printed escaped: its end is the first quote not preceded by a backslash.
        let mut escaped = false;
        let end = value.char_indices().find_map(|(i, c)| match (c, escaped) {
            ('\\', false) => {
                escaped = true;
                None
            }
            ('"', false) => Some(i + 1),
            _ => {
                escaped = false;
                None
            }
        });
        rest = end.map_or("", |end| &value[end..]);
    }
    out.push_str(rest);
    out
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

// === Raw (serde) side ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    limit: RawLimit,
    keys: RawKeys,
    log: RawLog,
    quota_savers: RawQuotaSavers,
    admin: RawAdmin,
    cluster: RawCluster,
    cache: RawCache,
    clients: RawClients,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawClients {
    require_token: bool,
    apps: Vec<RawApp>,
}

/// One `[[clients.apps]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    #[serde(default)]
    name: String,
    /// One digest, or several (a rotation: old and new token both valid).
    #[serde(default)]
    token_sha256: Option<StringList>,
    #[serde(default)]
    token: String,
    /// The name of an environment variable holding the token.
    #[serde(default)]
    token_env: String,
    #[serde(default)]
    api_key: String,
    #[serde(default)]
    alias: String,
    #[serde(default = "default_share")]
    share: u32,
    #[serde(default)]
    priority: String,
    #[serde(default)]
    requests_per_second: u32,
}

fn default_share() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    enabled: bool,
    max_size: ByteSize,
    max_object_size: ByteSize,
    #[serde(with = "humantime_serde")]
    min_ttl: Duration,
    #[serde(with = "humantime_serde")]
    max_ttl: Duration,
    #[serde(with = "humantime_serde")]
    stale_if_error: Duration,
    honor_client_no_cache: bool,
    #[serde(with = "humantime_serde")]
    negative_ttl: Duration,
    #[serde(with = "humantime_serde")]
    known_key_ttl: Duration,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            enabled: true,
            max_size: ByteSize(256 * 1024 * 1024),
            max_object_size: ByteSize(2 * 1024 * 1024),
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(6 * 60 * 60),
            stale_if_error: Duration::from_secs(24 * 60 * 60),
            honor_client_no_cache: false,
            negative_ttl: Duration::from_secs(60),
            known_key_ttl: Duration::from_secs(24 * 60 * 60),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCluster {
    redis_url: String,
    cluster_nodes: Vec<String>,
    namespace: String,
    expected_replicas: u32,
    #[serde(with = "humantime_serde")]
    call_timeout: Duration,
    require_redis: bool,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            cluster_nodes: Vec::new(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            expected_replicas: 1,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            require_redis: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN.to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawQuotaSavers {
    page: bool,
    dates: bool,
    append_to_response: bool,
}

impl Default for RawQuotaSavers {
    fn default() -> Self {
        Self {
            page: true,
            dates: true,
            append_to_response: true,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert_file: String,
    key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    tls: RawTls,
    max_connections: u32,
    workers: u32,
    h2_max_concurrent_streams: u32,
    max_header_bytes: ByteSize,
    max_request_body: ByteSize,
    allowed_hosts: StringList,
    cors_origins: StringList,
    #[serde(with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    shutdown_timeout: Duration,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            tls: RawTls::default(),
            max_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
            workers: 0,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            max_header_bytes: ByteSize(DEFAULT_MAX_HEADER_BYTES),
            max_request_body: ByteSize(DEFAULT_MAX_REQUEST_BODY),
            allowed_hosts: StringList::List(Vec::new()),
            cors_origins: StringList::List(Vec::new()),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    base_url: String,
    ca_file: String,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    request_timeout: Duration,
    max_connections: u32,
    #[serde(with = "humantime_serde")]
    idle_timeout: Duration,
    paths: StringList,
    max_buffered_body: ByteSize,
    min_delivery_rate: ByteSize,
}

/// A number of bytes: a TOML integer, or a string with a unit (`"8MiB"`, `"512 KiB"`, `"64KB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ByteSize(u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a number of bytes, or a size such as \"8MiB\"")]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(n) => Ok(Self(n)),
            Raw::Text(text) => parse_size(&text).map(Self).ok_or_else(|| {
                serde::de::Error::custom(
                    "expected a size such as \"8MiB\", \"512KiB\" or a number of bytes",
                )
            }),
        }
    }
}

/// `"8MiB"`, `"512 KiB"`, `"64KB"`, `"100"`: bytes, or `None` if it is not a size.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// A list given as a TOML array, or as one comma-separated string (how an environment variable
/// carries it: `TMDB_PROXY__UPSTREAM__PATHS=/3/,/4/`).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a list of strings, or one string of comma-separated items"
)]
enum StringList {
    List(Vec<String>),
    Joined(String),
}

impl StringList {
    fn into_items(self) -> Vec<String> {
        match self {
            Self::List(items) => items,
            Self::Joined(joined) => joined.split(',').map(str::to_owned).collect(),
        }
    }
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            ca_file: String::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_UPSTREAM_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            paths: StringList::List(DEFAULT_PATHS.iter().map(|p| (*p).to_owned()).collect()),
            max_buffered_body: ByteSize(DEFAULT_MAX_BUFFERED_BODY),
            min_delivery_rate: ByteSize(DEFAULT_MIN_DELIVERY_RATE),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimit {
    requests_per_second: u32,
    mode: String,
    #[serde(with = "humantime_serde")]
    max_wait: Duration,
    legacy_headers: bool,
    #[serde(with = "humantime_serde")]
    window_margin: Duration,
    #[serde(with = "humantime_serde")]
    sweep_interval: Duration,
    max_keys: u32,
    global_requests_per_second: u32,
    overrides: Vec<RawOverride>,
}

/// One `[[limit.overrides]]` entry: a key (or an alias from `[keys.aliases]`) with its own rate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverride {
    #[serde(default)]
    key: String,
    #[serde(default)]
    alias: String,
    requests_per_second: u32,
}

impl Default for RawLimit {
    fn default() -> Self {
        Self {
            requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            mode: "queue".to_owned(),
            max_wait: DEFAULT_MAX_WAIT,
            legacy_headers: false,
            window_margin: DEFAULT_WINDOW_MARGIN,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            max_keys: DEFAULT_MAX_KEYS,
            global_requests_per_second: 0,
            overrides: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKeys {
    default_api_key: String,
    default_api_key_file: String,
    /// Alias name → API key (or bearer token), for per-key metrics and overrides.
    aliases: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: DEFAULT_LOG_LEVEL.to_owned(),
            format: "text".to_owned(),
        }
    }
}

// === Validated side ===

/// The validated configuration. Each section goes to the module that owns it.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub limit: LimitConfig,
    pub keys: KeysConfig,
    pub log: LogConfig,
    pub quota_savers: QuotaSavers,
    pub admin: AdminConfig,
    pub cluster: ClusterConfig,
    pub cache: CacheConfig,
    pub clients: ClientsConfig,
}

/// Apps sharing the proxy's keys (`[clients]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientsConfig {
    /// A request without a known app token gets 401 code 3.
    pub require_token: bool,
    pub apps: Vec<AppConfig>,
}

/// One app: who it is (its token's digests), the key it is sent with, its share of that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// Metric and log label.
    pub name: String,
    /// SHA-256 of each token the app may present (more than one during a rotation).
    pub token_sha256: Vec<[u8; 32]>,
    /// The TMDB key (v3) or read token (v4) the app's requests are sent with.
    pub credential: Secret,
    /// Weight among the key's apps while it is saturated.
    pub share: NonZeroU32,
    pub priority: Priority,
    /// A hard cap of the app's own, under the key's.
    pub requests_per_second: Option<NonZeroU32>,
}

/// Which of a key's apps is served first while the key is saturated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Users waiting on the answer: served first.
    Interactive,
    /// Backfills and scrapers: what interactive traffic leaves, and a small floor.
    Batch,
}

/// The response cache (`[cache]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Total bytes held.
    pub max_size: u64,
    /// Larger responses are served but not stored.
    pub max_object_size: usize,
    /// Floor over TMDB's `max-age`.
    pub min_ttl: Duration,
    /// Ceiling over every entry's freshness (per-class ceilings lie below it).
    pub max_ttl: Duration,
    /// How long after expiry a copy may still answer when TMDB fails or the budget refuses.
    pub stale_if_error: Duration,
    /// A client's `Cache-Control: no-cache` forces a miss only when true.
    pub honor_client_no_cache: bool,
    /// How long a 404 code 34 is kept.
    pub negative_ttl: Duration,
    /// How long a key counts as known (may read the cache) after a 2xx from TMDB.
    pub known_key_ttl: Duration,
}

/// The shared budget on Redis (`[cluster]`). Off when `store` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub store: Option<RedisStore>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub namespace: String,
    /// While Redis is unreachable each replica allows `floor(N / expected_replicas)`.
    pub expected_replicas: NonZeroU32,
    pub call_timeout: Duration,
    /// `/readyz` answers 503 while the budget is local.
    pub require_redis: bool,
}

/// Where the shared budget lives.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisStore {
    /// One Redis (or Valkey): `redis://` or `rediss://` (TLS).
    Single(RedisUrl),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<RedisUrl>),
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Single(url) => f.debug_tuple("Single").field(url).finish(),
            Self::Cluster(nodes) => f.debug_tuple("Cluster").field(nodes).finish(),
        }
    }
}

/// A Redis URL, which may carry a password: shown with its userinfo redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(Secret);

impl RedisUrl {
    /// The URL itself; call only to connect.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// Whether the connection is TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.expose().starts_with("rediss://")
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shown_url(self.expose()))
    }
}

/// The admin listener: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// The client-facing listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Address the proxy accepts clients on.
    pub listen: SocketAddr,
    /// Concurrent client connections beyond this wait in the kernel's accept queue.
    pub max_connections: NonZeroU32,
    /// Threads serving client connections, each with a single-threaded runtime of its own and
    /// the connections it accepted (`0` in the file: one per CPU the process may use).
    pub workers: NonZeroU32,
    /// Concurrent HTTP/2 streams per client connection.
    pub h2_max_concurrent_streams: NonZeroU32,
    /// Most bytes of a request's headers, request line included.
    pub max_header_bytes: usize,
    /// Most bytes of a request body; a request is read whole before it may spend a token.
    pub max_request_body: usize,
    /// The proxy's own names (`host` or `host:port`, lowercase), checked against `Host` when the
    /// proxy injects its key. Empty: the loopback names on a loopback listener, else any.
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may use the injected key (`https://app.example`, or `*`). Empty: none.
    pub cors_origins: Vec<String>,
    /// A client that has not sent its request headers within this is disconnected; one that has
    /// not sent its whole request body within this, counted from its headers, gets 408.
    pub header_read_timeout: Duration,
    /// A connection with no bytes moving and no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// HTTPS on the client listener (`[server.tls]`); `None`: plain HTTP (and h2c).
    pub tls: Option<TlsConfig>,
}

/// TLS for the client listener: the certificate chain and its key, read at load. `server::tls`
/// turns them into a TLS configuration when the server is built, before it binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PemFile,
    pub key: PemFile,
}

/// A PEM file read at load: where it came from (for messages) and its text. `Debug` shows the
/// path only, so neither `check` nor a log line ever prints a private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    text: String,
}

impl PemFile {
    /// Reads `path`, the value of `key`.
    fn read(key: &'static str, path: &str) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(key, format!("cannot read `{path}`: {e}")))?;
        Ok(Self {
            path: PathBuf::from(path),
            text,
        })
    }

    /// The file's text, to be parsed as PEM.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.path, f)
    }
}

/// Where requests go, and how long they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Scheme and authority of the upstream (`https://api.themoviedb.org`); never a path.
    pub base_url: Uri,
    /// Extra PEM trust roots for the upstream's certificate, on top of the system and webpki
    /// roots (`ca_file`).
    pub ca: Option<PemFile>,
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// From sending the request to receiving response headers.
    pub request_timeout: Duration,
    /// The proxy never holds more upstream connections than this, idle ones included.
    pub max_connections: NonZeroU32,
    /// Idle pooled connections are closed after this.
    pub idle_timeout: Duration,
    /// Path prefixes forwarded; anything else gets 404 (code 34). Empty: every path.
    pub paths: Vec<String>,
    /// Most bytes of one response body held for a client slower than the upstream; within it the
    /// upstream connection is released as soon as the upstream is done.
    pub max_buffered_body: usize,
    /// Slowest a client may read, in bytes per second, while a body that does not fit the buffer
    /// holds its upstream connection.
    pub min_delivery_rate: u64,
}

impl UpstreamConfig {
    /// Whether connections made under `other` would be the same as under `self` (everything but
    /// `paths`, which only filters requests): a reload rebuilds the pool only when this is false.
    pub fn connects_like(&self, other: &Self) -> bool {
        self.base_url == other.base_url
            && self.max_buffered_body == other.max_buffered_body
            && self.min_delivery_rate == other.min_delivery_rate
            && self.ca == other.ca
            && self.connect_timeout == other.connect_timeout
            && self.request_timeout == other.request_timeout
            && self.max_connections == other.max_connections
            && self.idle_timeout == other.idle_timeout
    }
}

/// How requests queue when a key is over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// Wait (FIFO per key) for a token when it comes within `max_wait`; otherwise 429 at once.
    Queue,
    /// Answer 429 at once when no token is free.
    Reject,
}

/// The per-key rate limit.
#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// Ceiling of arrivals per key in any one-second window, as seen by the upstream.
    pub requests_per_second: NonZeroU32,
    pub mode: LimitMode,
    /// Longest wait for a token in `queue` mode (zero in `reject` mode).
    pub max_wait: Duration,
    /// Also send `X-RateLimit-Limit/Remaining/Reset`, for clients of TMDB's 2015-2019 API.
    pub legacy_headers: bool,
    /// Added to the one-second window so jitter between admission and arrival cannot bunch
    /// requests at the upstream.
    pub window_margin: Duration,
    /// How often buckets of idle keys are dropped.
    pub sweep_interval: Duration,
    /// Most keys with a bucket at once; `None`: no cap.
    pub max_keys: Option<NonZeroU32>,
    /// Keys with a rate of their own (an alias already resolved to its key).
    pub overrides: Vec<(Secret, NonZeroU32)>,
    /// Ceiling across all keys together; `None`: no global ceiling.
    pub global_requests_per_second: Option<NonZeroU32>,
}

/// API keys the proxy holds itself.
#[derive(Debug, Clone, Default)]
pub struct KeysConfig {
    /// Injected into requests that carry no key of their own.
    pub default_api_key: Option<Secret>,
    /// Operator-chosen names for keys: the only way a key appears in metrics.
    pub aliases: Vec<(String, Secret)>,
}

impl KeysConfig {
    /// The key named `alias` in `[keys.aliases]`.
    pub fn alias(&self, alias: &str) -> Option<Secret> {
        self.aliases
            .iter()
            .find(|(name, _)| name == alias)
            .map(|(_, secret)| secret.clone())
    }
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
    /// Where `level` came from, to name it if the filter is invalid: `log.level` or `RUST_LOG`.
    pub level_from: &'static str,
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, span fields (the request id) included.
    Json,
}

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it leaves the process for the upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// === impl Config ===

impl Config {
    /// Reads `path`, applies the process environment's `TMDB_PROXY__*` overrides (and `RUST_LOG`
    /// for the log filter), and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::from_toml_with_env(&text, None).map_err(|error| ConfigError::In {
            path: path.to_owned(),
            error: Box::new(error),
        })?;
        // The usual override of a Rust program's log filter wins over the file.
        if let Ok(filter) = std::env::var("RUST_LOG")
            && !filter.trim().is_empty()
        {
            cfg.log.level = filter;
            cfg.log.level_from = "RUST_LOG";
        }
        Ok(cfg)
    }

    /// Parses TOML text with no environment overrides (tests, `check`).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, Some(HashMap::new()))
    }

    /// Parses TOML text, then layers environment overrides: `env` when given (tests inject a map
    /// instead of mutating the process environment), else the process environment.
    pub fn from_toml_with_env(
        text: &str,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let layered = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .source(env),
            )
            .build()
            .map_err(|e| describe(e, text))?;
        let raw: RawConfig = layered.try_deserialize().map_err(|e| describe(e, text))?;
        Self::validate(raw)
    }

    /// The settings that differ between `self` and `running` but take effect only after a
    /// restart (sockets, logging, the sweeper's period), named for the warning a reload logs.
    /// Everything else a reload puts in force.
    pub fn restart_required(&self, running: &Config) -> Vec<&'static str> {
        // The request limits and names are read per request; the rest of [server] is the
        // listener's.
        let sockets = |server: &ServerConfig| ServerConfig {
            max_header_bytes: 0,
            max_request_body: 0,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            ..server.clone()
        };
        [
            (
                "server (listen, tls, max_connections, workers, timeouts)",
                sockets(&self.server) != sockets(&running.server),
            ),
            ("admin.listen", self.admin.listen != running.admin.listen),
            (
                "log",
                self.log.level != running.log.level || self.log.format != running.log.format,
            ),
            (
                "limit.sweep_interval",
                self.limit.sweep_interval != running.limit.sweep_interval,
            ),
            ("cluster", self.cluster != running.cluster),
            (
                "limit.global_requests_per_second turned on or off (with [cluster])",
                self.cluster.store.is_some()
                    && self.limit.global_requests_per_second.is_some()
                        != running.limit.global_requests_per_second.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let keys = validate_keys(raw.keys)?;
        let clients = validate_clients(raw.clients, &keys, &|name| std::env::var(name).ok())?;
        let cfg = Self {
            server: validate_server(raw.server)?,
            upstream: validate_upstream(raw.upstream)?,
            limit: validate_limit(raw.limit, &keys)?,
            keys,
            log: validate_log(raw.log)?,
            admin: AdminConfig {
                listen: parse_listen("admin.listen", &raw.admin.listen)?,
            },
            quota_savers: QuotaSavers {
                page: raw.quota_savers.page,
                dates: raw.quota_savers.dates,
                append_to_response: raw.quota_savers.append_to_response,
            },
            cluster: validate_cluster(raw.cluster)?,
            cache: validate_cache(raw.cache)?,
            clients,
        };
        // A token's stamp is taken in Redis during the call; the request leaves after the reply.
        // The window's margin must cover that way back as well as the departure tolerance.
        let most = cfg.limit.window_margin / 2;
        if cfg.cluster.store.is_some() && cfg.cluster.call_timeout > most {
            return Err(invalid(
                "cluster.call_timeout",
                format!(
                    "must be at most half of limit.window_margin ({most:?}), or a slow reply could \
                     let a request reach the upstream outside its window"
                ),
            ));
        }
        Ok(cfg)
    }
}

/// Most apps in `[[clients.apps]]`.
const MAX_APPS: usize = 256;

/// Largest `share`.
const MAX_SHARE: u32 = 10_000;

fn validate_clients(
    raw: RawClients,
    keys: &KeysConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClientsConfig, ConfigError> {
    const APPS: &str = "clients.apps";
    if raw.apps.len() > MAX_APPS {
        return Err(invalid(APPS, format!("at most {MAX_APPS} apps")));
    }
    if raw.require_token && raw.apps.is_empty() {
        return Err(invalid(
            "clients.require_token",
            "is on but no [[clients.apps]] are configured: every request would get 401",
        ));
    }
    let mut apps: Vec<AppConfig> = Vec::with_capacity(raw.apps.len());
    for (i, app) in raw.apps.into_iter().enumerate() {
        let n = i + 1;
        let name = app.name.trim().to_owned();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(invalid(
                APPS,
                format!("entry {n}: name must be 1-64 letters, digits, `_` or `-`"),
            ));
        }
        if apps.iter().any(|seen| seen.name == name) {
            return Err(invalid(
                APPS,
                format!("app `{name}`: the name is used twice"),
            ));
        }
        let mut digests = Vec::new();
        for digest in app
            .token_sha256
            .map(StringList::into_items)
            .unwrap_or_default()
        {
            digests.push(parse_sha256(digest.trim()).ok_or_else(|| {
                invalid(
                    APPS,
                    format!("app `{name}`: token_sha256 must be 64 hex digits (SHA-256)"),
                )
            })?);
        }
        let token = app.token.trim();
        if !token.is_empty() {
            digests.push(sha256(token.as_bytes()));
        }
        let token_env = app.token_env.trim();
        if !token_env.is_empty() {
            let token = env(token_env).unwrap_or_default();
            let token = token.trim();
            if token.is_empty() {
                return Err(invalid(
                    APPS,
                    format!(
                        "app `{name}`: token_env names `{token_env}`, which is not set or empty"
                    ),
                ));
            }
            digests.push(sha256(token.as_bytes()));
        }
        if digests.is_empty() {
            return Err(invalid(
                APPS,
                format!("app `{name}`: give token_sha256, token or token_env"),
            ));
        }
        if let Some(other) = apps
            .iter()
            .find(|seen| seen.token_sha256.iter().any(|d| digests.contains(d)))
        {
            return Err(invalid(
                APPS,
                format!(
                    "app `{name}`: a token of app `{}` is given again",
                    other.name
                ),
            ));
        }
        let credential = match (app.api_key.trim(), app.alias.trim()) {
            (key, "") if !key.is_empty() => Secret(key.to_owned()),
            ("", alias) if !alias.is_empty() => keys.alias(alias).ok_or_else(|| {
                    invalid(
                        APPS,
                        format!("app `{name}`: alias `{alias}` is not defined in [keys.aliases]"),
                    )
                })?,
            ("", "") => keys.default_api_key.clone().ok_or_else(|| {
                invalid(
                    APPS,
                    format!(
                        "app `{name}`: give api_key or alias (or set keys.default_api_key for it to use)"
                    ),
                )
            })?,
            _ => {
                return Err(invalid(
                    APPS,
                    format!("app `{name}`: give api_key or alias, not both"),
                ));
            }
        };
        if credential
            .expose()
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                APPS,
                format!("app `{name}`: the key contains whitespace or control characters"),
            ));
        }
        let share = NonZeroU32::new(app.share)
            .filter(|share| share.get() <= MAX_SHARE)
            .ok_or_else(|| {
                invalid(
                    APPS,
                    format!("app `{name}`: share must be 1 to {MAX_SHARE}"),
                )
            })?;
        let priority = match app.priority.trim().to_ascii_lowercase().as_str() {
            "" | "interactive" => Priority::Interactive,
            "batch" => Priority::Batch,
            _ => {
                return Err(invalid(
                    APPS,
                    format!("app `{name}`: priority must be \"interactive\" or \"batch\""),
                ));
            }
        };
        if app.requests_per_second > MAX_REQUESTS_PER_SECOND {
            return Err(invalid(
                APPS,
                format!(
                    "app `{name}`: requests_per_second must be 0 (no cap) to {MAX_REQUESTS_PER_SECOND}"
                ),
            ));
        }
        apps.push(AppConfig {
            name,
            token_sha256: digests,
            credential,
            share,
            priority,
            requests_per_second: NonZeroU32::new(app.requests_per_second),
        });
    }
    Ok(ClientsConfig {
        require_token: raw.require_token,
        apps,
    })
}

/// The SHA-256 digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// 64 hex digits (either case) as a digest.
fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |b: u8| char::from(b).to_digit(16);
    let mut out = [0; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// TMDB's API terms: nothing cached for longer than six months.
const MAX_CACHE_AGE: Duration = Duration::from_secs(183 * 24 * 60 * 60);

fn validate_cache(raw: RawCache) -> Result<CacheConfig, ConfigError> {
    if raw.max_size.0 == 0 {
        return Err(invalid(
            "cache.max_size",
            "must be more than 0 (set cache.enabled = false to turn it off)",
        ));
    }
    let max_object_size = usize::try_from(raw.max_object_size.0)
        .ok()
        .filter(|&n| n > 0 && n as u64 <= raw.max_size.0)
        .ok_or_else(|| {
            invalid(
                "cache.max_object_size",
                "must be more than 0 and at most cache.max_size",
            )
        })?;
    for (key, value) in [
        ("cache.max_ttl", raw.max_ttl),
        ("cache.stale_if_error", raw.stale_if_error),
        ("cache.negative_ttl", raw.negative_ttl),
        ("cache.known_key_ttl", raw.known_key_ttl),
    ] {
        if value > MAX_CACHE_AGE {
            return Err(invalid(
                key,
                "at most 183 days: TMDB's terms allow no longer",
            ));
        }
    }
    if raw.max_ttl.is_zero() || raw.min_ttl > raw.max_ttl {
        return Err(invalid(
            "cache.min_ttl",
            "must be at most cache.max_ttl, which must be more than 0",
        ));
    }
    if raw.max_ttl + raw.stale_if_error > MAX_CACHE_AGE {
        return Err(invalid(
            "cache.stale_if_error",
            "with cache.max_ttl, at most 183 days: TMDB's terms allow no longer",
        ));
    }
    Ok(CacheConfig {
        enabled: raw.enabled,
        max_size: raw.max_size.0,
        max_object_size,
        min_ttl: raw.min_ttl,
        max_ttl: raw.max_ttl,
        stale_if_error: raw.stale_if_error,
        honor_client_no_cache: raw.honor_client_no_cache,
        negative_ttl: raw.negative_ttl,
        known_key_ttl: raw.known_key_ttl,
    })
}

fn validate_cluster(raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
    let url = |key: &'static str, text: &str| -> Result<RedisUrl, ConfigError> {
        let text = text.trim();
        let shown = shown_url(text);
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(invalid(
                key,
                format!("`{shown}` is not a redis:// or rediss:// URL"),
            ));
        };
        if scheme != "redis" && scheme != "rediss" {
            return Err(invalid(
                key,
                format!("`{shown}`: the scheme must be redis or rediss"),
            ));
        }
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        if host.is_empty() || host.starts_with('/') {
            return Err(invalid(key, format!("`{shown}` names no host")));
        }
        // The password may be in the URL, so redis-rs's own message is not shown.
        redis::IntoConnectionInfo::into_connection_info(text)
            .map_err(|_| invalid(key, format!("`{shown}` is not a valid Redis URL")))?;
        Ok(RedisUrl(Secret::new(text)))
    };
    let store = match (
        raw.redis_url.trim().is_empty(),
        raw.cluster_nodes.is_empty(),
    ) {
        (true, true) => None,
        (false, false) => {
            return Err(invalid(
                "cluster.cluster_nodes",
                "set either cluster.redis_url or cluster.cluster_nodes, not both",
            ));
        }
        (false, true) => Some(RedisStore::Single(url(
            "cluster.redis_url",
            &raw.redis_url,
        )?)),
        (true, false) => Some(RedisStore::Cluster(
            raw.cluster_nodes
                .iter()
                .map(|node| url("cluster.cluster_nodes", node))
                .collect::<Result<_, _>>()?,
        )),
    };
    let namespace = raw.namespace.trim().to_owned();
    if namespace.is_empty()
        || namespace.len() > 64
        || !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(invalid(
            "cluster.namespace",
            "1 to 64 characters of letters, digits, `-`, `_`, `.` and `:`",
        ));
    }
    let expected_replicas = NonZeroU32::new(raw.expected_replicas)
        .filter(|n| n.get() <= 1000)
        .ok_or_else(|| invalid("cluster.expected_replicas", "must be 1 to 1000"))?;
    if raw.call_timeout.is_zero() || raw.call_timeout > MAX_CALL_TIMEOUT {
        return Err(invalid(
            "cluster.call_timeout",
            format!("must be more than 0 and at most {MAX_CALL_TIMEOUT:?}"),
        ));
    }
    Ok(ClusterConfig {
        store,
        namespace,
        expected_replicas,
        call_timeout: raw.call_timeout,
        require_redis: raw.require_redis,
    })
}

fn parse_listen(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse::<SocketAddr>().map_err(|_| {
        invalid(
            key,
            format!(
                "`{value}` is not an IP address with a port (expected e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"
            ),
        )
    })
}

/// Most serving threads: beyond the cores there are, more only adds switching.
const MAX_WORKERS: u32 = 1024;

/// `server.workers`, with `0` resolved to the CPUs this process may use (its affinity mask and
/// cgroup quota included: a sidecar limited to one core gets one thread).
fn workers(configured: u32) -> Result<NonZeroU32, ConfigError> {
    if configured > MAX_WORKERS {
        return Err(invalid(
            "server.workers",
            format!("{configured} is more than {MAX_WORKERS} threads (0 means one per CPU)"),
        ));
    }
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(MAX_WORKERS));
    let n = if configured == 0 { cores } else { configured };
    Ok(NonZeroU32::new(n.min(MAX_WORKERS)).unwrap_or(NonZeroU32::MIN))
}

fn validate_server(raw: RawServer) -> Result<ServerConfig, ConfigError> {
    Ok(ServerConfig {
        listen: parse_listen("server.listen", &raw.listen)?,
        max_connections: non_zero("server.max_connections", raw.max_connections)?,
        workers: workers(raw.workers)?,
        h2_max_concurrent_streams: non_zero(
            "server.h2_max_concurrent_streams",
            raw.h2_max_concurrent_streams,
        )?,
        max_header_bytes: size_within(
            "server.max_header_bytes",
            raw.max_header_bytes,
            MIN_HEADER_BYTES,
            MAX_HEADER_BYTES,
        )?,
        max_request_body: size_within(
            "server.max_request_body",
            raw.max_request_body,
            0,
            MAX_REQUEST_BODY,
        )?,
        allowed_hosts: names("server.allowed_hosts", raw.allowed_hosts, |host| {
            !host.contains(['/', '@', ' ']) && !host.is_empty()
        })?,
        cors_origins: names("server.cors_origins", raw.cors_origins, |origin| {
            origin == "*"
                || ((origin.starts_with("https://") || origin.starts_with("http://"))
                    && !origin.trim_end_matches('/').contains(['@', ' '])
                    && origin.matches('/').count() == 2)
        })?,
        header_read_timeout: positive("server.header_read_timeout", raw.header_read_timeout)?,
        idle_timeout: positive("server.idle_timeout", raw.idle_timeout)?,
        shutdown_timeout: bounded("server.shutdown_timeout", raw.shutdown_timeout)?,
        tls: validate_tls(raw.tls)?,
    })
}

/// The items of `list`, trimmed and lowercased, each checked by `valid`.
fn names(
    key: &'static str,
    list: StringList,
    valid: impl Fn(&str) -> bool,
) -> Result<Vec<String>, ConfigError> {
    let mut items = Vec::new();
    for item in list.into_items() {
        let item = item.trim().trim_end_matches('/').to_ascii_lowercase();
        if item.is_empty() {
            continue;
        }
        if !valid(&item) {
            return Err(invalid(key, format!("`{item}` is not a valid entry")));
        }
        items.push(item);
    }
    Ok(items)
}

fn validate_tls(raw: RawTls) -> Result<Option<TlsConfig>, ConfigError> {
    let (cert_file, key_file) = (raw.cert_file.trim(), raw.key_file.trim());
    match (cert_file.is_empty(), key_file.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {}
        _ => {
            return Err(invalid(
                "server.tls",
                "set both cert_file and key_file (PEM), or neither",
            ));
        }
    }
    Ok(Some(TlsConfig {
        cert: PemFile::read("server.tls.cert_file", cert_file)?,
        key: PemFile::read("server.tls.key_file", key_file)?,
    }))
}

/// `url` as an error may show it: any userinfo (`user:password@`) is redacted.
fn shown_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}<redacted>{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn validate_upstream(raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
    const KEY: &str = "upstream.base_url";
    let shown = shown_url(&raw.base_url);
    let uri: Uri = raw.base_url.trim().parse().map_err(|e| {
        invalid(
            KEY,
            format!("`{shown}` is not a URL ({e}); expected e.g. \"https://api.themoviedb.org\""),
        )
    })?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(invalid(
                KEY,
                format!("`{shown}` must start with http:// or https://"),
            ));
        }
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(invalid(
            KEY,
            format!(
                "`{shown}` carries a user name or password; give the upstream as scheme and host only"
            ),
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(KEY, format!("`{shown}` has no host")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid(
            KEY,
            format!(
                "`{shown}` must be scheme and host only (the client's path, e.g. /3/movie/550, is appended)"
            ),
        ));
    }
    let ca = match raw.ca_file.trim() {
        "" => None,
        path => Some(PemFile::read("upstream.ca_file", path)?),
    };
    let mut paths = Vec::new();
    for path in raw.paths.into_items() {
        let path = path.trim();
        if path.is_empty() {
            continue;
        }
        if !path.starts_with('/') {
            return Err(invalid(
                "upstream.paths",
                format!("`{path}` must start with / (e.g. \"/3/\")"),
            ));
        }
        paths.push(path.to_owned());
    }
    Ok(UpstreamConfig {
        base_url: uri,
        paths,
        ca,
        connect_timeout: positive("upstream.connect_timeout", raw.connect_timeout)?,
        request_timeout: positive("upstream.request_timeout", raw.request_timeout)?,
        max_connections: non_zero("upstream.max_connections", raw.max_connections)?,
        idle_timeout: positive("upstream.idle_timeout", raw.idle_timeout)?,
        max_buffered_body: usize::try_from(raw.max_buffered_body.0)
            .ok()
            .filter(|&n| n >= MIN_BUFFERED_BODY)
            .ok_or_else(|| {
                invalid(
                    "upstream.max_buffered_body",
                    "must be at least 64KiB (and fit this machine's memory)",
                )
            })?,
        min_delivery_rate: match raw.min_delivery_rate.0 {
            0 => {
                return Err(invalid(
                    "upstream.min_delivery_rate",
                    "must be at least 1 byte per second",
                ));
            }
            rate => rate,
        },
    })
}

/// Accepted `server.max_header_bytes`: 1 KiB to 1 MiB (a request line alone can be 1 KiB; the
/// HTTP/1 parser's buffer is sized from this).
const MIN_HEADER_BYTES: usize = 1024;
const MAX_HEADER_BYTES: usize = 1024 * 1024;
/// Largest accepted `server.max_request_body`: bodies are held in memory, 64 MiB.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

/// `size` as bytes, if within `min..=max`.
fn size_within(
    key: &'static str,
    size: ByteSize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    usize::try_from(size.0)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| invalid(key, format!("must be from {min} to {max} bytes")))
}

/// Smallest accepted `max_buffered_body`: below it ordinary TMDB answers would stream.
const MIN_BUFFERED_BODY: usize = 64 * 1024;

fn validate_limit(raw: RawLimit, keys: &KeysConfig) -> Result<LimitConfig, ConfigError> {
    const OVERRIDES: &str = "limit.overrides";
    let mut overrides = Vec::with_capacity(raw.overrides.len());
    for (i, entry) in raw.overrides.into_iter().enumerate() {
        let rps = NonZeroU32::new(entry.requests_per_second)
            .filter(|rps| rps.get() <= MAX_REQUESTS_PER_SECOND)
            .ok_or_else(|| {
                invalid(
                    OVERRIDES,
                    format!(
                        "entry {}: requests_per_second must be 1 to {MAX_REQUESTS_PER_SECOND}",
                        i + 1
                    ),
                )
            })?;
        let secret = match (entry.key.trim(), entry.alias.trim()) {
            (key, "") if !key.is_empty() => Secret(key.to_owned()),
            ("", alias) if !alias.is_empty() => keys.alias(alias).ok_or_else(|| {
                invalid(
                    OVERRIDES,
                    format!(
                        "entry {}: alias `{alias}` is not defined in [keys.aliases]",
                        i + 1
                    ),
                )
            })?,
            _ => {
                return Err(invalid(
                    OVERRIDES,
                    format!("entry {}: give exactly one of `key` or `alias`", i + 1),
                ));
            }
        };
        if overrides
            .iter()
            .any(|(seen, _): &(Secret, NonZeroU32)| seen == &secret)
        {
            return Err(invalid(
                OVERRIDES,
                format!("entry {}: this key already has an override", i + 1),
            ));
        }
        overrides.push((secret, rps));
    }
    let global_requests_per_second = match raw.global_requests_per_second {
        0 => None,
        rps if rps > MAX_REQUESTS_PER_SECOND => {
            return Err(invalid(
                "limit.global_requests_per_second",
                format!("{rps} is above the supported maximum of {MAX_REQUESTS_PER_SECOND}"),
            ));
        }
        rps => NonZeroU32::new(rps),
    };
    let requests_per_second = non_zero("limit.requests_per_second", raw.requests_per_second)?;
    if requests_per_second.get() > MAX_REQUESTS_PER_SECOND {
        return Err(invalid(
            "limit.requests_per_second",
            format!(
                "{} is above the supported maximum of {MAX_REQUESTS_PER_SECOND}",
                raw.requests_per_second
            ),
        ));
    }
    let mode = match raw.mode.trim().to_ascii_lowercase().as_str() {
        "queue" => LimitMode::Queue,
        "reject" => LimitMode::Reject,
        other => {
            return Err(invalid(
                "limit.mode",
                format!("`{other}` is not a mode; expected \"queue\" or \"reject\""),
            ));
        }
    };
    if raw.max_wait > MAX_MAX_WAIT {
        return Err(invalid(
            "limit.max_wait",
            format!(
                "{} is longer than the maximum of {}",
                humantime::format_duration(raw.max_wait),
                humantime::format_duration(MAX_MAX_WAIT)
            ),
        ));
    }
    if raw.window_margin < MIN_WINDOW_MARGIN {
        return Err(invalid(
            "limit.window_margin",
            format!(
                "{} is shorter than the minimum of {}",
                humantime::format_duration(raw.window_margin),
                humantime::format_duration(MIN_WINDOW_MARGIN)
            ),
        ));
    }
    if raw.window_margin > MAX_WINDOW_MARGIN {
        return Err(invalid(
            "limit.window_margin",
            format!(
                "{} is longer than the maximum of {}",
                humantime::format_duration(raw.window_margin),
                humantime::format_duration(MAX_WINDOW_MARGIN)
            ),
        ));
    }
    Ok(LimitConfig {
        requests_per_second,
        mode,
        max_wait: match mode {
            LimitMode::Queue => raw.max_wait,
            LimitMode::Reject => Duration::ZERO,
        },
        legacy_headers: raw.legacy_headers,
        window_margin: raw.window_margin,
        sweep_interval: positive("limit.sweep_interval", raw.sweep_interval)?,
        max_keys: NonZeroU32::new(raw.max_keys),
        overrides,
        global_requests_per_second,
    })
}

fn validate_keys(raw: RawKeys) -> Result<KeysConfig, ConfigError> {
    let inline = raw.default_api_key.trim();
    let file = raw.default_api_key_file.trim();
    let key = match (inline.is_empty(), file.is_empty()) {
        (true, true) => None,
        (false, true) => Some(inline.to_owned()),
        (true, false) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                invalid(
                    "keys.default_api_key_file",
                    format!("cannot read `{file}`: {e}"),
                )
            })?;
            let key = text.trim();
            if key.is_empty() {
                return Err(invalid(
                    "keys.default_api_key_file",
                    format!("`{file}` is empty"),
                ));
            }
            Some(key.to_owned())
        }
        (false, false) => {
            return Err(invalid(
                "keys.default_api_key",
                "set either default_api_key or default_api_key_file, not both",
            ));
        }
    };
    if let Some(key) = &key
        && key.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "keys.default_api_key",
            "the key contains whitespace or control characters",
        ));
    }
    let mut aliases = Vec::with_capacity(raw.aliases.len());
    for (alias, key) in raw.aliases {
        let valid_name = !alias.is_empty()
            && alias.len() <= 64
            && alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(invalid(
                "keys.aliases",
                format!("alias `{alias}` must be 1-64 letters, digits, `_` or `-`"),
            ));
        }
        let key = key.trim();
        if key.is_empty() {
            return Err(invalid(
                "keys.aliases",
                format!("alias `{alias}` names an empty key"),
            ));
        }
        if aliases
            .iter()
            .any(|(_, seen): &(String, Secret)| seen.expose() == key)
        {
            return Err(invalid(
                "keys.aliases",
                format!("alias `{alias}` names a key that already has another alias"),
            ));
        }
        aliases.push((alias, Secret(key.to_owned())));
    }
    Ok(KeysConfig {
        default_api_key: key.map(Secret),
        aliases,
    })
}

fn validate_log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let level = raw.level.trim().to_owned();
    if level.is_empty() {
        return Err(invalid(
            "log.level",
            "empty; expected a level such as \"info\" or a filter such as \"tmdb_proxy=debug\"",
        ));
    }
    let format = match raw.format.trim().to_ascii_lowercase().as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(invalid(
                "log.format",
                format!("`{other}` is not a format; expected \"text\" or \"json\""),
            ));
        }
    };
    Ok(LogConfig {
        level,
        level_from: "log.level",
        format,
    })
}

fn non_zero(key: &'static str, value: u32) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(value).ok_or_else(|| invalid(key, "must be at least 1"))
}

/// Longest accepted timeout or interval: anything longer is a typo, and would overflow clocks.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

fn positive(key: &'static str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        Err(invalid(
            key,
            "must be longer than zero (e.g. \"2s\", \"250ms\")",
        ))
    } else {
        bounded(key, value)
    }
}

fn bounded(key: &'static str, value: Duration) -> Result<Duration, ConfigError> {
    if value > MAX_DURATION {
        Err(invalid(
            key,
            format!(
                "{} is longer than the maximum of 1 day",
                humantime::format_duration(value)
            ),
        ))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = Config::from_toml_str("").unwrap();
        assert_eq!(cfg.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(cfg.upstream.base_url, DEFAULT_BASE_URL);
        assert_eq!(cfg.limit.requests_per_second.get(), 50);
        assert_eq!(cfg.limit.mode, LimitMode::Queue);
        assert_eq!(cfg.limit.max_wait, Duration::from_secs(2));
        assert_eq!(cfg.upstream.max_connections.get(), 20);
        assert!(cfg.keys.default_api_key.is_none());
    }

    #[test]
    fn cluster_is_off_by_default_and_its_password_never_shows() {
        let cfg = Config::from_toml_str("").unwrap();
        assert_eq!(cfg.cluster.store, None);
        assert_eq!(cfg.cluster.namespace, "tmdb-proxy");
        assert_eq!(cfg.cluster.call_timeout, Duration::from_millis(25));
        let url = "redis://app:hunter2-secret@10.0.0.5:6380/2";
        let cfg = Config::from_toml_with_env(
            "",
            env(&[
                ("TMDB_PROXY__CLUSTER__REDIS_URL", url),
                ("TMDB_PROXY__CLUSTER__EXPECTED_REPLICAS", "3"),
            ]),
        )
        .unwrap();
        let Some(RedisStore::Single(found)) = &cfg.cluster.store else {
            panic!("{:?}", cfg.cluster);
        };
        assert_eq!(found.expose(), url);
        assert_eq!(cfg.cluster.expected_replicas.get(), 3);
        let shown = format!("{cfg:?} {found}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://<redacted>@10.0.0.5:6380/2"),
            "{shown}"
        );
        let nodes = Config::from_toml_str(
            "[cluster]\ncluster_nodes = [\"redis://127.0.0.1:7000\", \"rediss://h:7001\"]\n",
        )
        .unwrap();
        assert!(matches!(nodes.cluster.store, Some(RedisStore::Cluster(ref n)) if n.len() == 2));
    }

    #[test]
    fn bad_cluster_settings_are_refused_without_the_password() {
        for (toml, key) in [
            (
                "redis_url = \"http://u:hunter2@h:6379\"",
                "cluster.redis_url",
            ),
            ("redis_url = \"redis://u:hunter2@\"", "cluster.redis_url"),
            (
                "redis_url = \"redis://h\"\ncluster_nodes = [\"redis://h2\"]",
                "cluster.cluster_nodes",
            ),
            (
                "cluster_nodes = [\"nope://u:hunter2@h\"]",
                "cluster.cluster_nodes",
            ),
            ("namespace = \"a{b}\"", "cluster.namespace"),
            ("namespace = \"\"", "cluster.namespace"),
            ("expected_replicas = 0", "cluster.expected_replicas"),
            ("call_timeout = \"0s\"", "cluster.call_timeout"),
            ("call_timeout = \"5s\"", "cluster.call_timeout"),
            (
                "redis_url = \"redis://h\"\ncall_timeout = \"40ms\"",
                "cluster.call_timeout",
            ),
        ] {
            let error = Config::from_toml_str(&format!("[cluster]\n{toml}\n")).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(key), "{toml}: {text}");
            assert!(!text.contains("hunter2"), "{toml}: {text}");
        }
    }

    #[test]
    fn durations_are_human_strings() {
        let cfg = Config::from_toml_str(
            "[upstream]\nconnect_timeout = \"250ms\"\nrequest_timeout = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(cfg.upstream.connect_timeout, Duration::from_millis(250));
        assert_eq!(cfg.upstream.request_timeout, Duration::from_secs(60));
    }

    #[test]
    fn environment_overrides_file() {
        let cfg = Config::from_toml_with_env(
            "[server]\nlisten = \"127.0.0.1:8080\"\n",
            env(&[
                ("TMDB_PROXY__SERVER__LISTEN", "127.0.0.1:9000"),
                ("TMDB_PROXY__LIMIT__REQUESTS_PER_SECOND", "7"),
                ("TMDB_PROXY__LIMIT__LEGACY_HEADERS", "true"),
                ("TMDB_PROXY__KEYS__DEFAULT_API_KEY", "0123abc"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.server.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.limit.requests_per_second.get(), 7);
        assert!(cfg.limit.legacy_headers);
        assert_eq!(
            cfg.keys.default_api_key.as_ref().map(Secret::expose),
            Some("0123abc")
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[limit]\nrequests_per_secnd = 5\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("requests_per_secnd"), "{msg}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
            ("[upstream]\nbase_url = \"ftp://x\"\n", "upstream.base_url"),
            (
                "[upstream]\nbase_url = \"https://h/3/\"\n",
                "upstream.base_url",
            ),
            (
                "[upstream]\nbase_url = \"https://user:pass@h\"\n",
                "`https://<redacted>@h` carries a user name or password",
            ),
            (
                "[limit]\nrequests_per_second = 0\n",
                "limit.requests_per_second",
            ),
            ("[limit]\nmode = \"drop\"\n", "limit.mode"),
            (
                "[upstream]\nca_file = \"/nonexistent.pem\"\n",
                "upstream.ca_file",
            ),
            (
                "[upstream]\nconnect_timeout = \"0s\"\n",
                "upstream.connect_timeout",
            ),
        ];
        for (toml, key) in cases {
            let msg = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(msg.contains(key), "{toml:?} gave {msg}");
        }
    }

    #[test]
    fn bad_duration_names_its_key() {
        let msg = Config::from_toml_str("[limit]\nmax_wait = \"two seconds\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("max_wait"), "{msg}");
    }

    #[test]
    fn paths_and_savers_from_file_and_environment() {
        let cfg = Config::from_toml_str("").unwrap();
        assert_eq!(cfg.upstream.paths, ["/3/", "/4/"]);
        assert_eq!(cfg.quota_savers, QuotaSavers::ALL);
        let cfg = Config::from_toml_with_env(
            "[upstream]\npaths = []\n[quota_savers]\npage = false\n",
            env(&[("TMDB_PROXY__QUOTA_SAVERS__DATES", "false")]),
        )
        .unwrap();
        assert!(cfg.upstream.paths.is_empty());
        assert!(
            !cfg.quota_savers.page
                && !cfg.quota_savers.dates
                && cfg.quota_savers.append_to_response
        );
        let cfg =
            Config::from_toml_with_env("", env(&[("TMDB_PROXY__UPSTREAM__PATHS", "/3/,/4/list/")]))
                .unwrap();
        assert_eq!(cfg.upstream.paths, ["/3/", "/4/list/"]);
        let msg = Config::from_toml_str("[upstream]\npaths = [\"3/\"]\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("upstream.paths"), "{msg}");
    }

    #[test]
    fn apps_are_validated_and_their_secrets_never_shown() {
        let digest = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        let cfg = Config::from_toml_str(&format!(
            "[keys]\ndefault_api_key = \"DEFAULTKEY\"\n[keys.aliases]\nmain = \"MAINKEY\"\n\
             [clients]\nrequire_token = true\n\
             [[clients.apps]]\nname = \"web\"\ntoken_sha256 = \"{digest}\"\nalias = \"main\"\nshare = 3\n\
             [[clients.apps]]\nname = \"scraper\"\ntoken = \"SCRAPERTOKEN\"\npriority = \"batch\"\nrequests_per_second = 5\n"
        ))
        .unwrap();
        let apps = &cfg.clients.apps;
        assert!(cfg.clients.require_token);
        assert_eq!(
            apps[0].token_sha256,
            [sha256(b"test")],
            "either case of hex"
        );
        assert_eq!(
            (apps[0].credential.expose(), apps[0].share.get()),
            ("MAINKEY", 3)
        );
        assert_eq!(apps[0].priority, Priority::Interactive);
        assert_eq!(
            apps[1].credential.expose(),
            "DEFAULTKEY",
            "the default key when none given"
        );
        assert_eq!(apps[1].token_sha256, [sha256(b"SCRAPERTOKEN")]);
        assert_eq!(apps[1].priority, Priority::Batch);
        assert_eq!(apps[1].requests_per_second.map(NonZeroU32::get), Some(5));
        assert!(!format!("{cfg:?}").contains("SCRAPERTOKEN"));

        let app = "[[clients.apps]]\nname = \"a\"\napi_key = \"APPKEY\"\n";
        for (toml, says) in [
            (app.to_owned(), "give token_sha256, token or token_env"),
            (format!("{app}token_sha256 = \"abc\"\n"), "64 hex digits"),
            (
                format!("{app}token = \"T0KEN1\"\nshare = 0\n"),
                "share must be 1",
            ),
            (
                format!("{app}token = \"T0KEN1\"\npriority = \"urgent\"\n"),
                "priority must be",
            ),
            (
                format!("{app}token = \"T0KEN1\"\nalias = \"x\"\n"),
                "api_key or alias, not both",
            ),
            (
                format!("{app}token_env = \"TMDB_PROXY_TEST_UNSET_VAR\"\n"),
                "not set or empty",
            ),
            (
                format!(
                    "{app}token = \"T0KEN1\"\n[[clients.apps]]\nname = \"b\"\ntoken = \"T0KEN1\"\napi_key = \"K\"\n"
                ),
                "a token of app `a` is given again",
            ),
            (
                format!(
                    "{app}token = \"T0KEN1\"\n[[clients.apps]]\nname = \"a\"\ntoken = \"T0KEN2\"\napi_key = \"K\"\n"
                ),
                "used twice",
            ),
            (
                "[[clients.apps]]\nname = \"no key\"\ntoken = \"T0KEN1\"\n".to_owned(),
                "name must be",
            ),
            (
                "[[clients.apps]]\nname = \"nokey\"\ntoken = \"T0KEN1\"\n".to_owned(),
                "give api_key or alias",
            ),
            (
                "[clients]\nrequire_token = true\n".to_owned(),
                "no [[clients.apps]]",
            ),
        ] {
            let msg = Config::from_toml_str(&toml).unwrap_err().to_string();
            assert!(msg.contains(says), "{toml}: {msg}");
            for secret in ["T0KEN1", "T0KEN2", "APPKEY"] {
                assert!(!msg.contains(secret), "{secret} shown: {msg}");
            }
        }
    }

    #[test]
    fn overrides_by_key_or_alias() {
        let cfg = Config::from_toml_str(
            "[keys.aliases]\nweb = \"WEBKEY\"\n[limit]\nglobal_requests_per_second = 80\n\
             [[limit.overrides]]\nalias = \"web\"\nrequests_per_second = 10\n\
             [[limit.overrides]]\nkey = \"OTHER\"\nrequests_per_second = 5\n",
        )
        .unwrap();
        let overrides: Vec<(&str, u32)> = cfg
            .limit
            .overrides
            .iter()
            .map(|(s, r)| (s.expose(), r.get()))
            .collect();
        assert_eq!(overrides, [("WEBKEY", 10), ("OTHER", 5)]);
        assert_eq!(
            cfg.limit.global_requests_per_second.map(NonZeroU32::get),
            Some(80)
        );
        let msg = Config::from_toml_str(
            "[[limit.overrides]]\nalias = \"nope\"\nrequests_per_second = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("limit.overrides") && msg.contains("nope"),
            "{msg}"
        );
        let msg = Config::from_toml_str("[[limit.overrides]]\nrequests_per_second = 1\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("exactly one"), "{msg}");
    }

    #[test]
    fn duplicates_and_tiny_margins_are_refused() {
        let msg = Config::from_toml_str(
            "[keys.aliases]\nweb = \"K\"\n[[limit.overrides]]\nalias = \"web\"\nrequests_per_second = 1\n\
             [[limit.overrides]]\nkey = \"K\"\nrequests_per_second = 2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("already has an override"), "{msg}");
        let msg = Config::from_toml_str("[keys.aliases]\na = \"K\"\nb = \"K\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("keys.aliases"), "{msg}");
        let msg = Config::from_toml_str("[limit]\nwindow_margin = \"2ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("limit.window_margin"), "{msg}");
    }

    #[test]
    fn reject_mode_never_waits() {
        let cfg = Config::from_toml_str("[limit]\nmode = \"reject\"\nmax_wait = \"5s\"\n").unwrap();
        assert_eq!(cfg.limit.max_wait, Duration::ZERO);
    }

    #[test]
    fn a_reload_names_what_only_a_restart_changes() {
        let running = Config::from_toml_str("").unwrap();
        let same_sockets = Config::from_toml_str(
            "[limit]\nrequests_per_second = 5\n[upstream]\nmax_connections = 3\n",
        )
        .unwrap();
        assert!(same_sockets.restart_required(&running).is_empty());
        let moved = Config::from_toml_str(
            "[server]\nlisten = \"127.0.0.1:9\"\n[log]\nformat = \"json\"\n\
             [limit]\nsweep_interval = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(
            moved.restart_required(&running),
            [
                "server (listen, tls, max_connections, workers, timeouts)",
                "log",
                "limit.sweep_interval"
            ]
        );
    }

    #[test]
    fn errors_name_the_place_never_the_value() {
        let secret = "SECRETKEY123";
        let cases = [
            (
                format!("[keys]\ndefault_api_key = \"{secret}\n"),
                "line 2, column 32",
            ),
            (
                format!("[keys]\ndefault_api_key = {secret}\n"),
                "line 2, column 19",
            ),
            (
                format!("[keys]\ndefault_api_key = \"{secret}\"\ndefault_api_key = \"x\"\n"),
                "line 3, column 1",
            ),
            (
                format!("[limit]\nrequests_per_second = \"{secret}\"\n"),
                "`limit.requests_per_second`: expected an integer, found a string",
            ),
            (
                format!("[limit]\nmax_wait = \"{secret} \\\" s\"\n"),
                "`limit.max_wait`: invalid value: a string, expected a duration",
            ),
            (
                format!("[keys]\naliases = \"{secret}\"\n"),
                "`keys.aliases`",
            ),
            (
                format!("[[limit.overrides]]\nkey = \"{secret}\"\nrequests_per_second = \"x\"\n"),
                "requests_per_second`: expected an integer",
            ),
            ("[upstream]\npaths = 5\n".to_owned(), "a list of strings"),
        ];
        for (toml, named) in cases {
            let message = Config::from_toml_str(&toml).unwrap_err().to_string();
            assert!(message.contains(named), "{toml:?} gave {message}");
            assert!(!message.contains(secret), "{toml:?} gave {message}");
        }
        let message = Config::from_toml_with_env(
            "",
            env(&[("TMDB_PROXY__LIMIT__REQUESTS_PER_SECOND", secret)]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            message.contains("limit.requests_per_second") && !message.contains(secret),
            "{message}"
        );
    }

    #[test]
    fn workers_default_to_the_cpus_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cfg = Config::from_toml_str("").unwrap();
        assert_eq!(cfg.server.workers.get() as usize, cores);
        let cfg = Config::from_toml_str("[server]\nworkers = 3\n").unwrap();
        assert_eq!(cfg.server.workers.get(), 3);
        let message = Config::from_toml_str("[server]\nworkers = 5000\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("server.workers"), "{message}");
    }

    #[test]
    fn sizes_are_bytes_or_strings_with_a_unit() {
        let cfg = Config::from_toml_str("").unwrap();
        assert_eq!(cfg.upstream.max_buffered_body, 8 << 20);
        assert_eq!(cfg.upstream.min_delivery_rate, 64 << 10);
        assert_eq!(cfg.server.h2_max_concurrent_streams.get(), 128);
        assert_eq!(cfg.server.max_header_bytes, 32 << 10);
        assert_eq!(cfg.server.max_request_body, 1 << 20);
        let cfg = Config::from_toml_with_env(
            "[upstream]\nmax_buffered_body = \"16 MiB\"\nmin_delivery_rate = 1000\n",
            env(&[("TMDB_PROXY__UPSTREAM__MIN_DELIVERY_RATE", "100KB")]),
        )
        .unwrap();
        assert_eq!(cfg.upstream.max_buffered_body, 16 << 20);
        assert_eq!(cfg.upstream.min_delivery_rate, 100_000);
        for (toml, key) in [
            (
                "[upstream]\nmax_buffered_body = \"8 parsecs\"\n",
                "max_buffered_body",
            ),
            (
                "[upstream]\nmax_buffered_body = 1024\n",
                "upstream.max_buffered_body",
            ),
            (
                "[upstream]\nmin_delivery_rate = 0\n",
                "upstream.min_delivery_rate",
            ),
            (
                "[server]\nh2_max_concurrent_streams = 0\n",
                "server.h2_max_concurrent_streams",
            ),
        ] {
            let message = Config::from_toml_str(toml).unwrap_err().to_string();
            assert!(message.contains(key), "{toml:?} gave {message}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let cfg =
            Config::from_toml_with_env("", env(&[("TMDB_PROXY__KEYS__DEFAULT_API_KEY", "s3cr3t")]))
                .unwrap();
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
    }
}
