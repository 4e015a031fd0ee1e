//! The connection to Redis: one multiplexed connection (or a Redis Cluster connection), opened
//! lazily, every call bounded by `cluster.call_timeout`.
//!
//! redis-rs's `ConnectionManager` makes a call wait through its reconnect back-off, and a cluster
//! connection is only had by connecting: neither may hold up a request. So each call is wrapped
//! in its own timeout, the cluster connection is made in a task of its own, and a call before it
//! exists fails at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ScriptInvocation, Value};
use tokio::time::Instant;

use crate::config::{ClusterConfig, RedisStore};

/// Why a call to Redis gave no answer. Messages never include the URL (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("no answer from Redis within {0:?}")]
    Timeout(Duration),
    #[error("not connected to Redis yet")]
    NotConnected,
    #[error("Redis: {0}")]
    Redis(String),
    #[error("Redis answered something the budget did not expect: {0}")]
    Reply(String),
}

/// A Redis connection for the shared budget; cheap to clone.
#[derive(Clone)]
pub(super) struct Link {
    conn: Conn,
    timeout: Duration,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<Lazy>),
}

/// A cluster connection, made in the background on first use and again after a failed attempt.
struct Lazy {
    client: redis::cluster::ClusterClient,
    conn: Mutex<LazyState>,
}

enum LazyState {
    Idle { last_try: Option<Instant> },
    Connecting,
    Ready(ClusterConnection),
}

/// Least time between two attempts to connect to a Redis Cluster.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.conn {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("Link")
            .field("kind", &kind)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Link {
    /// A link for `cfg.store`, not yet connected. Fails only on a URL redis-rs refuses.
    pub(super) fn new(cfg: &ClusterConfig, store: &RedisStore) -> Result<Self, LinkError> {
        let conn = match store {
            RedisStore::Single(url) => {
                let client = redis::Client::open(url.expose())
                    .map_err(|_| LinkError::Redis(format!("cannot use the URL {url}")))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.call_timeout.max(Duration::from_millis(250))))
                    .set_response_timeout(Some(cfg.call_timeout))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500))
                    .set_number_of_retries(2);
                let manager = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| LinkError::Redis(e.to_string()))?;
                Conn::Single(manager)
            }
            RedisStore::Cluster(nodes) => {
                let client = redis::cluster::ClusterClient::builder(
                    nodes.iter().map(|url| url.expose().to_owned()),
                )
                .connection_timeout(cfg.call_timeout.max(Duration::from_millis(250)))
                .response_timeout(cfg.call_timeout)
                .retries(1)
                .build()
                .map_err(|_| LinkError::Redis("cannot use the cluster node URLs".into()))?;
                Conn::Cluster(Arc::new(Lazy {
                    client,
                    conn: Mutex::new(LazyState::Idle { last_try: None }),
                }))
            }
        };
        Ok(Self {
            conn,
            timeout: cfg.call_timeout,
        })
    }

    /// Runs the script (EVALSHA, loading it on NOSCRIPT) within the call timeout.
    pub(super) async fn invoke(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, LinkError> {
        let call = async {
            match &self.conn {
                Conn::Single(manager) => invocation.invoke_async(&mut manager.clone()).await,
                Conn::Cluster(lazy) => match lazy.connection() {
                    Some(mut conn) => invocation.invoke_async(&mut conn).await,
                    None => return Err(LinkError::NotConnected),
                },
            }
            .map_err(|e| LinkError::Redis(e.to_string()))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(answer) => answer,
            Err(_) => Err(LinkError::Timeout(self.timeout)),
        }
    }
}

impl Lazy {
    /// The connection if there is one; else starts an attempt (at most every
    /// [`RECONNECT_EVERY`]) in a task of its own and returns `None`.
    fn connection(self: &Arc<Self>) -> Option<ClusterConnection> {
        let mut state = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match &*state {
            LazyState::Ready(conn) => return Some(conn.clone()),
            LazyState::Connecting => return None,
            LazyState::Idle { last_try } => {
                if last_try.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                    return None;
                }
            }
        }
        *state = LazyState::Connecting;
        let this = self.clone();
        tokio::spawn(async move {
            let made = this.client.get_async_connection().await;
            let mut state = this.conn.lock().unwrap_or_else(|e| e.into_inner());
            *state = match made {
                Ok(conn) => LazyState::Ready(conn),
                Err(error) => {
                    tracing::debug!(%error, "cannot connect to the Redis Cluster yet");
                    LazyState::Idle {
                        last_try: Some(Instant::now()),
                    }
                }
            };
        });
        None
    }
}
