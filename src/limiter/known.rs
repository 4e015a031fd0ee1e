//! Keys the upstream has lately answered with success: their requests take their turns for an
//! upstream connection before those of keys it has not (a client inventing keys by the hundred
//! gets 401s from TMDB, and queues behind every real key).

use dashmap::DashMap;
use tokio::time::Instant;

use super::key::Key;

/// How long a key counts as known after a success: a day.
pub const KNOWN_KEY_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// Most keys remembered; when full, keys not seen for a TTL go first, then newcomers wait.
const MAX_KNOWN: usize = 100_000;

/// How stale a key's last success may be before it is written again (a write per request would
/// cost more than the information is worth).
const REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// The keys with a recent success.
#[derive(Debug, Default)]
pub struct KnownKeys {
    seen: DashMap<Key, Instant, foldhash::fast::RandomState>,
}

impl KnownKeys {
    /// `key`'s request was answered with success at `now`.
    pub fn note_success(&self, key: Key, now: Instant) {
        if self
            .seen
            .get(&key)
            .is_some_and(|at| now.saturating_duration_since(*at) < REFRESH)
        {
            return;
        }
        if self.seen.len() >= MAX_KNOWN && !self.seen.contains_key(&key) {
            self.seen
                .retain(|_, at| now.saturating_duration_since(*at) < KNOWN_KEY_TTL);
            if self.seen.len() >= MAX_KNOWN {
                return;
            }
        }
        self.seen.insert(key, now);
    }

    /// Whether `key` had a success within `ttl` before `now`.
    pub fn is_known_within(&self, key: Key, now: Instant, ttl: std::time::Duration) -> bool {
        self.seen
            .get(&key)
            .is_some_and(|at| now.saturating_duration_since(*at) < ttl)
    }

    /// The upstream refused `key` (401): it is not known any more.
    pub fn forget(&self, key: Key) {
        self.seen.remove(&key);
    }

    /// Whether `key` had a success within the TTL before `now`.
    pub fn is_known(&self, key: Key, now: Instant) -> bool {
        self.seen
            .get(&key)
            .is_some_and(|at| now.saturating_duration_since(*at) < KNOWN_KEY_TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_is_known_for_a_day_after_a_success() {
        let known = KnownKeys::default();
        let key = Key::of("k");
        assert!(!known.is_known(key, Instant::now()));
        known.note_success(key, Instant::now());
        assert!(known.is_known(key, Instant::now()));
        tokio::time::advance(KNOWN_KEY_TTL - std::time::Duration::from_secs(1)).await;
        assert!(known.is_known(key, Instant::now()));
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(!known.is_known(key, Instant::now()));
    }
}
