//! The table of buckets, one per key, in a `DashMap`.
//!
//! Every method takes what it needs and returns owned values: no `Ref`/`RefMut` ever leaves this
//! module, so no caller can hold a shard lock across an `.await` (a known DashMap deadlock).
//!
//! The map hashes with foldhash, seeded per process: a key is already a 64-bit hash, so SipHash
//! would only cost time, while a fixed (or identity) hash of a public function would let a client
//! craft keys that pile into one bucket chain.

use dashmap::DashMap;

use super::bucket::{Bucket, Decision, Nanos, Quota};
use super::key::Key;

/// Buckets by key.
#[derive(Debug, Default)]
pub struct Store {
    buckets: DashMap<Key, Bucket, foldhash::fast::RandomState>,
}

impl Store {
    /// Asks `key`'s bucket for a token at `now`, creating the bucket on first use.
    pub fn check_at(&self, key: Key, now: Nanos, quota: Quota, max_wait: Nanos) -> Decision {
        self.buckets
            .entry(key)
            .or_default()
            .acquire(now, quota, max_wait)
    }

    /// Returns an unused queued slot (see [`Bucket::release`]).
    pub fn release(&self, key: Key, at: Nanos) {
        if let Some(mut bucket) = self.buckets.get_mut(&key) {
            bucket.release(at);
        }
    }

    /// Moves `key`'s token stamped at `old` to `now` if it fits (see [`Bucket::restamp`]).
    pub fn restamp(&self, key: Key, old: Nanos, now: Nanos, quota: Quota) -> bool {
        // The bucket may have been swept while the request waited for a connection.
        self.buckets
            .entry(key)
            .or_default()
            .restamp(old, now, quota)
    }

    /// Whether `key` is paused at `t`.
    pub fn is_paused(&self, key: Key, t: Nanos) -> bool {
        self.buckets
            .get(&key)
            .is_some_and(|bucket| bucket.is_paused(t))
    }

    /// Tokens free for `key` at `now`, and when a request could next be admitted.
    pub fn peek(&self, key: Key, now: Nanos, quota: Quota) -> (u32, Nanos) {
        match self.buckets.get_mut(&key) {
            Some(mut bucket) => bucket.peek(now, quota),
            None => (quota.capacity, now),
        }
    }

    /// Pauses `key` until `until`; returns whether it was not paused already.
    pub fn pause(&self, key: Key, now: Nanos, until: Nanos) -> bool {
        self.buckets.entry(key).or_default().pause(now, until)
    }

    /// Drops buckets that have fully refilled by `now`; returns how many remain.
    pub fn retain_recent(&self, now: Nanos, quota: Quota) -> usize {
        self.buckets.retain(|_, bucket| !bucket.is_idle(now, quota));
        self.buckets.len()
    }

    /// Whether `key` has a bucket.
    pub fn contains(&self, key: Key) -> bool {
        self.buckets.contains_key(&key)
    }

    /// Buckets in the table.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = 1_000_000_000;

    #[test]
    fn keys_are_isolated_and_idle_ones_dropped() {
        let store = Store::default();
        let quota = Quota {
            capacity: 1,
            window: SEC,
        };
        let (a, b) = (Key::from_credential("a"), Key::from_credential("b"));
        assert!(matches!(
            store.check_at(a, 0, quota, 0),
            Decision::Admit { .. }
        ));
        assert!(matches!(
            store.check_at(a, 1, quota, 0),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            store.check_at(b, 1, quota, 0),
            Decision::Admit { .. }
        ));
        assert_eq!(store.len(), 2);
        assert_eq!(store.retain_recent(SEC, quota), 1);
        assert_eq!(store.retain_recent(SEC + 1, quota), 0);
    }
}
