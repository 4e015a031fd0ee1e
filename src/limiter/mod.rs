//! The rate limiter: one bucket per key, shared by every connection.
//!
//! This facade is the only place a rate decision reads the clock (`tokio::time::Instant`, so tests
//! drive it with a paused clock). It knows nothing of HTTP: it answers [`Admission`] or
//! [`Rejection`], and the proxy turns those into headers and bodies.

pub mod bucket;
pub mod key;
pub mod store;

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::LimitConfig;
pub use bucket::{Decision, Nanos, Quota};
pub use key::{Identity, Key, Source};
pub use store::Store;

/// A request that may go upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Requests per second allowed for the key.
    pub limit: u32,
    /// Tokens still free after this request.
    pub remaining: u32,
    /// Time until another request could be admitted (zero while tokens remain).
    pub reset_after: Duration,
    /// Time this request waited in the queue.
    pub waited: Duration,
}

/// A request refused because its key is over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Requests per second allowed for the key.
    pub limit: u32,
    /// Requests in the current window, this one included.
    pub count: u32,
    /// Time until a request could be admitted.
    pub retry_after: Duration,
}

/// The per-key limiter.
#[derive(Debug)]
pub struct Limiter {
    store: Store,
    quota: Quota,
    /// Longest a request may queue, in nanoseconds (zero in reject mode).
    max_wait: Nanos,
    /// Origin of the limiter's nanosecond clock.
    epoch: Instant,
}

// === impl Limiter ===

impl Limiter {
    /// A limiter for `cfg`, with its clock starting now.
    pub fn new(cfg: &LimitConfig) -> Self {
        let window = Duration::from_secs(1) + cfg.window_margin;
        Self {
            store: Store::default(),
            quota: Quota {
                capacity: cfg.requests_per_second.get(),
                window: duration_nanos(window),
            },
            max_wait: duration_nanos(cfg.max_wait),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> Nanos {
        duration_nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// Takes a token for `key`, waiting in the key's FIFO queue when the token comes within
    /// `max_wait`. If the returned future is dropped while waiting (the client went away), the
    /// queued slot is given back.
    pub async fn acquire(&self, key: Key) -> Result<Admission, Rejection> {
        let now = self.now();
        match self.store.check_at(key, now, self.quota, self.max_wait) {
            Decision::Deny { count, next_free } => Err(Rejection {
                limit: self.quota.capacity,
                count,
                retry_after: Duration::from_nanos(next_free.saturating_sub(now)),
            }),
            Decision::Admit {
                at,
                remaining,
                next_free,
            } => {
                if at > now {
                    let slot = QueuedSlot {
                        store: &self.store,
                        key,
                        at,
                        armed: true,
                    };
                    tokio::time::sleep_until(self.epoch + Duration::from_nanos(at)).await;
                    slot.used();
                }
                Ok(Admission {
                    limit: self.quota.capacity,
                    remaining,
                    reset_after: Duration::from_nanos(next_free.saturating_sub(at)),
                    waited: Duration::from_nanos(at - now),
                })
            }
        }
    }

    /// Drops buckets of keys that have gone idle; returns how many remain.
    pub fn sweep(&self) -> usize {
        self.store.retain_recent(self.now(), self.quota)
    }

    /// Buckets currently held.
    pub fn active_keys(&self) -> usize {
        self.store.len()
    }

    /// Runs [`Limiter::sweep`] every `every` until the limiter is dropped.
    pub fn spawn_sweeper(limiter: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(limiter);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(limiter) => {
                        let left = limiter.sweep();
                        tracing::trace!(active_keys = left, "swept idle buckets");
                    }
                    None => break,
                }
            }
        })
    }
}

/// A queued slot that is returned to its bucket unless the request actually went.
struct QueuedSlot<'a> {
    store: &'a Store,
    key: Key,
    at: Nanos,
    armed: bool,
}

impl QueuedSlot<'_> {
    fn used(mut self) {
        self.armed = false;
    }
}

impl Drop for QueuedSlot<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.store.release(self.key, self.at);
        }
    }
}

fn duration_nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limiter(toml: &str) -> Arc<Limiter> {
        Arc::new(Limiter::new(&Config::from_toml_str(toml).unwrap().limit))
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_reject_then_refill() {
        let l = limiter("[limit]\nrequests_per_second = 3\nmode = \"reject\"\n");
        let k = Key::from_credential("k");
        for remaining in [2, 1, 0] {
            assert_eq!(l.acquire(k).await.unwrap().remaining, remaining);
        }
        let rejected = l.acquire(k).await.unwrap_err();
        assert_eq!(rejected.count, 4);
        assert_eq!(rejected.retry_after, Duration::from_millis(1050));
        tokio::time::advance(Duration::from_millis(1050)).await;
        assert!(l.acquire(k).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_waits_for_its_slot() {
        let l = limiter("[limit]\nrequests_per_second = 1\nmax_wait = \"2s\"\n");
        let k = Key::from_credential("k");
        l.acquire(k).await.unwrap();
        let start = Instant::now();
        let admitted = l.acquire(k).await.unwrap();
        assert_eq!(admitted.waited, Duration::from_millis(1050));
        assert_eq!(start.elapsed(), Duration::from_millis(1050));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_waiter_gives_its_slot_back() {
        let l = limiter("[limit]\nrequests_per_second = 1\nmax_wait = \"1500ms\"\n");
        let k = Key::from_credential("k");
        l.acquire(k).await.unwrap();
        // A waiter that gives up after 100 ms.
        let gave_up = tokio::time::timeout(Duration::from_millis(100), l.acquire(k)).await;
        assert!(gave_up.is_err());
        // Its slot (at 1.05 s) is free again, so this one fits within max_wait.
        let admitted = l.acquire(k).await.unwrap();
        assert_eq!(admitted.waited, Duration::from_millis(950));
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_drops_idle_buckets() {
        let l = limiter("[limit]\nrequests_per_second = 5\nsweep_interval = \"1s\"\n");
        let _sweeper = Limiter::spawn_sweeper(&l, Duration::from_secs(1));
        for i in 0..100 {
            l.acquire(Key::from_credential(&format!("k{i}"))).await.unwrap();
        }
        assert_eq!(l.active_keys(), 100);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(l.active_keys(), 0);
    }
}
