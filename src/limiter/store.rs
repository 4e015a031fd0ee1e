//! The table of buckets, one per key, in a `DashMap`.
//!
//! Every access is a closure run on one key's bucket under its shard's lock (the shape of
//! governor's `StateStore::measure_and_replace`): the closure is synchronous and returns an owned
//! value, so no `Ref`/`RefMut` ever leaves this module and no caller can hold a shard lock across
//! an `.await` (a known DashMap deadlock). What a closure does is the bucket's business.
//!
//! Each entry is 32 bytes: the key, the bucket's [`Quick`] copy (refreshed after every change,
//! under the write lock), and the bucket in a box. A key far over its limit is refused from the
//! copy under the read lock (`LocalBudget`), so a flood of such keys reads a table as compact as
//! governor's and threads on one key do not wait for each other.
//!
//! The map hashes with foldhash, seeded per process: a key is already a 64-bit hash, so SipHash
//! would only cost time, while a fixed (or identity) hash of a public function would let a client
//! craft keys that pile into one bucket chain.

use dashmap::DashMap;

use super::bucket::{Bucket, Nanos, Quick, Quota};
use super::key::Key;

/// Buckets by key.
#[derive(Debug, Default)]
pub struct Store {
    buckets: DashMap<Key, Slot, foldhash::fast::RandomState>,
}

/// A key's bucket, boxed, and inline beside it the copy of what a refusal under the read lock
/// needs (refreshed after every change). A key far over its limit is then refused from a
/// 32-byte entry: the table a flood of keys reads stays small, as governor's does.
#[derive(Debug, Default)]
struct Slot {
    quick: Quick,
    bucket: Box<Bucket>,
}

impl Store {
    /// Runs `f` on `key`'s bucket, creating an empty bucket first if there is none.
    /// `quota` is the key's: the inline copy is worked out for it.
    pub fn update<T>(&self, key: Key, quota: Quota, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let mut slot = self.buckets.entry(key).or_default();
        let out = f(&mut slot.bucket);
        slot.quick = slot.bucket.quick(quota);
        out
    }

    /// Runs `f` on `key`'s bucket if it has one. Lookups that must not grow the table (a peek, a
    /// release, a key that may be new while the table is full) go through here.
    pub fn update_existing<T>(
        &self,
        key: Key,
        quota: Quota,
        f: impl FnOnce(&mut Bucket) -> T,
    ) -> Option<T> {
        self.buckets.get_mut(&key).map(|mut slot| {
            let out = f(&mut slot.bucket);
            slot.quick = slot.bucket.quick(quota);
            out
        })
    }

    /// The inline copy of `key`'s [`Quick`], under the shard's read lock (lookups from several
    /// threads at once do not wait for each other), without touching the bucket itself.
    pub fn quick(&self, key: Key) -> Option<Quick> {
        self.buckets.get(&key).map(|slot| slot.quick)
    }

    /// Drops buckets that hold nothing any more at `now`; returns how many remain.
    pub fn retain_recent(&self, now: Nanos, quota: Quota) -> usize {
        self.buckets
            .retain(|_, slot| !slot.bucket.is_idle(now, quota));
        self.buckets.len()
    }

    /// What `f` makes of each bucket, where it makes something.
    pub fn collect<T>(&self, mut f: impl FnMut(Key, &Bucket) -> Option<T>) -> Vec<T> {
        self.buckets
            .iter()
            .filter_map(|entry| f(*entry.key(), &entry.value().bucket))
            .collect()
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
    use crate::limiter::bucket::Decision;

    const SEC: Nanos = 1_000_000_000;

    #[test]
    fn keys_are_isolated_and_idle_ones_dropped() {
        let store = Store::default();
        let quota = Quota {
            capacity: 1,
            window: SEC,
        };
        let (a, b) = (Key::of("a"), Key::of("b"));
        let acquire = |key, now| store.update(key, quota, |bucket| bucket.acquire(now, quota, 0));
        assert!(matches!(acquire(a, 0), Decision::Admit { .. }));
        assert!(matches!(acquire(a, 1), Decision::Deny { .. }));
        assert!(matches!(acquire(b, 1), Decision::Admit { .. }));
        assert_eq!(store.len(), 2);
        assert_eq!(store.retain_recent(SEC, quota), 1);
        assert_eq!(store.retain_recent(SEC + 1, quota), 0);
        // Looking at a key without a bucket does not create one.
        assert_eq!(
            store.update_existing(a, quota, |bucket| bucket.held()),
            None
        );
        assert!(store.is_empty());
    }
}
