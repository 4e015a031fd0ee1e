//! The identity of one budget: a key, held only as a 64-bit hash.
//!
//! The limiter never sees a credential: the proxy names the account a request spends (see
//! `tmdb::auth`) and hashes that name here, so the table never holds a raw key and logs show a
//! short fingerprint of the hash.

use std::fmt;
use std::hash::{Hash, Hasher};

/// A hashed account name: the identity of one bucket.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(u64);

impl Key {
    /// The bucket of the budget shared by all keys (`global_requests_per_second`). A real key
    /// hashing to exactly this value has a 1 in 2^64 chance.
    pub const GLOBAL: Key = Key(0);

    /// The key of the account named `name`.
    ///
    /// The hash is fixed (not per process) so fingerprints in logs stay comparable across restarts.
    pub fn of(name: &str) -> Self {
        #[allow(deprecated)]
        // SipHash-2-4 with fixed keys: stable across runs, no extra dependency.
        let mut hasher =
            std::hash::SipHasher::new_with_keys(0x746d_6462_2d70_726f, 0x7879_2d6b_6579_7321);
        name.hash(&mut hasher);
        Self(hasher.finish())
    }

    /// The hash, as an opaque number (the pool takes turns between keys by it).
    pub fn id(&self) -> u64 {
        self.0
    }

    /// A short, non-reversible label for logs.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint((self.0 >> 32) as u32)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

/// The top 32 bits of a key's hash, printed as 8 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(u32);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_does_not_contain_the_key() {
        let k = "0123456789abcdef0123456789abcdef";
        let shown = format!("{:?} {}", Key::of(k), Key::of(k).fingerprint());
        assert!(!shown.contains(k) && !shown.contains("01234567"));
        assert_ne!(Key::of("a"), Key::of("b"));
    }
}
