//! Cost of one admit decision: the proxy's limiter store beside `governor`'s keyed limiter doing
//! the same work in the same run (a 50/s quota per key; every decision reads the clock, as in
//! production), for one hot key, 10,000 keys round-robin, and two threads contending on one key.
//!
//! Run: `cargo bench --bench limiter`. Criterion's report comes first; the closing table gives
//! ns per decision for both and the ratio (ours / governor), measured back to back.

// A benchmark reports on stdout.
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group};
use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota, RateLimiter};
use tmdb_proxy::limiter::bucket::{Nanos, Quota};
use tmdb_proxy::limiter::{Key, Store};
use tokio::time::Instant;

const RPS: u32 = 50;
const QUOTA: Quota = Quota {
    capacity: RPS,
    window: 1_050_000_000,
};

/// The proxy's limiter store with the clock read per decision, as the facade does.
///
/// Production reads `tokio::time::Instant`, which is `std::time::Instant` unless tokio's
/// `test-util` feature is on. Benchmarks are built with the dev-dependencies, and so with
/// `test-util`, whose clock first looks for a paused test clock. The production clock is used here
/// directly instead.
struct Ours {
    store: Store,
    #[allow(clippy::disallowed_types)]
    epoch: std::time::Instant,
}

impl Ours {
    fn new() -> Self {
        Self {
            store: Store::default(),
            #[allow(clippy::disallowed_types)]
            epoch: std::time::Instant::now(),
        }
    }

    /// As `LocalBudget` decides: a refusal under the read lock when the key's earliest slot is
    /// beyond the wait, else the bucket's full decision under the write lock.
    fn decide(&self, key: Key) -> bool {
        let now = self.epoch.elapsed().as_nanos() as Nanos;
        if let Some(quick) = self.store.quick(key)
            && quick.deny(now, QUOTA, 0).is_some()
        {
            return false;
        }
        matches!(
            self.store
                .update(key, QUOTA, |bucket| bucket.acquire(now, QUOTA, 0)),
            tmdb_proxy::limiter::Decision::Admit { .. }
        )
    }
}

fn governor() -> DefaultKeyedRateLimiter<Key> {
    RateLimiter::keyed(GovernorQuota::per_second(NonZeroU32::new(RPS).unwrap()))
}

fn keys(n: usize) -> Vec<Key> {
    (0..n).map(|i| Key::of(&format!("key-{i:08}"))).collect()
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("admit");
    for (label, n) in [("hot key", 1), ("10k keys", 10_000)] {
        let keys = keys(n);
        let ours = Ours::new();
        let mut i = 0;
        group.bench_function(format!("tmdb-proxy, {label}"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(ours.decide(keys[i]))
            })
        });
        let gov = governor();
        let mut i = 0;
        group.bench_function(format!("governor, {label}"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(gov.check_key(&keys[i]).is_ok())
            })
        });
    }
    group.finish();
}

/// `threads` threads each making `per_thread` decisions on one shared key; returns ns/decision.
fn contended<F: Fn() -> bool + Send + Sync + 'static>(
    decide: Arc<F>,
    threads: usize,
    per_thread: u64,
) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let decide = decide.clone();
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    black_box(decide());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed().as_nanos() as f64 / (threads as u64 * per_thread) as f64
}

fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("admit");
    let key = Key::of("hot");
    let ours = Arc::new(Ours::new());
    group.bench_function("tmdb-proxy, 2 threads on one key", |b| {
        b.iter_custom(|iters| {
            let ours = ours.clone();
            let ns = contended(Arc::new(move || ours.decide(key)), 2, iters.div_ceil(2));
            Duration::from_nanos((ns * iters as f64) as u64)
        })
    });
    let gov = Arc::new(governor());
    group.bench_function("governor, 2 threads on one key", |b| {
        b.iter_custom(|iters| {
            let gov = gov.clone();
            let ns = contended(
                Arc::new(move || gov.check_key(&key).is_ok()),
                2,
                iters.div_ceil(2),
            );
            Duration::from_nanos((ns * iters as f64) as u64)
        })
    });
    group.finish();
}

/// Median ns/decision of `rounds` timed runs of `n` decisions.
fn median_ns(rounds: usize, n: u64, mut run: impl FnMut(u64) -> f64) -> f64 {
    let mut samples: Vec<f64> = (0..rounds).map(|_| run(n)).collect();
    samples.sort_by(f64::total_cmp);
    samples[rounds / 2]
}

fn timed(n: u64, mut step: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        step(i);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// The closing table: both limiters, same cases, interleaved rounds.
fn summary() {
    const N: u64 = 2_000_000;
    const ROUNDS: usize = 7;
    println!();
    println!("| case | tmdb-proxy ns/decision | governor ns/decision | ratio |");
    println!("|---|---|---|---|");
    for (label, n) in [("one hot key", 1usize), ("10,000 keys round-robin", 10_000)] {
        let keys = keys(n);
        let ours = Ours::new();
        let gov = governor();
        let a = median_ns(ROUNDS, N, |n| {
            timed(n, |i| {
                black_box(ours.decide(keys[i as usize % keys.len()]));
            })
        });
        let b = median_ns(ROUNDS, N, |n| {
            timed(n, |i| {
                black_box(gov.check_key(&keys[i as usize % keys.len()]).is_ok());
            })
        });
        println!("| {label} | {a:.1} | {b:.1} | {:.2} |", a / b);
    }
    let key = Key::of("hot");
    let ours = Arc::new(Ours::new());
    let gov = Arc::new(governor());
    let a = median_ns(ROUNDS, N / 2, |n| {
        let ours = ours.clone();
        contended(Arc::new(move || ours.decide(key)), 2, n)
    });
    let b = median_ns(ROUNDS, N / 2, |n| {
        let gov = gov.clone();
        contended(Arc::new(move || gov.check_key(&key).is_ok()), 2, n)
    });
    println!("| 2 threads, one key | {a:.1} | {b:.1} | {:.2} |", a / b);
}

criterion_group!(benches, single_thread, two_threads);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench -- <filter>` or `--list` runs criterion only.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.is_empty() {
        summary();
    }
}
