//! Cost of one admit decision: the proxy's store (DashMap of sliding-window buckets) beside a
//! `Mutex<HashMap>` of the same buckets, so the ratio shows what the sharded map buys.
//!
//! Run: `cargo bench --bench limiter`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Mutex;

use criterion::{Criterion, criterion_group, criterion_main};
use tmdb_proxy::limiter::bucket::{Bucket, Nanos, Quota};
use tmdb_proxy::limiter::{Key, Store};

const QUOTA: Quota = Quota {
    capacity: 50,
    window: 1_050_000_000,
};

/// Advance the clock so a hot key is admitted each time (1/50th of a window per decision).
const STEP: Nanos = 21_000_000;

fn keys(n: usize) -> Vec<Key> {
    (0..n)
        .map(|i| Key::from_credential(&format!("key-{i:08}")))
        .collect()
}

fn decisions(c: &mut Criterion) {
    let mut group = c.benchmark_group("admit");
    for (label, n) in [("hot key", 1), ("10k keys", 10_000)] {
        let keys = keys(n);
        let store = Store::default();
        let mut now: Nanos = 0;
        let mut i = 0;
        group.bench_function(format!("dashmap store, {label}"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                now += STEP;
                black_box(store.check_at(keys[i], now, QUOTA, 0))
            })
        });
        let baseline: Mutex<HashMap<Key, Bucket>> = Mutex::new(HashMap::new());
        let mut now: Nanos = 0;
        let mut i = 0;
        group.bench_function(format!("mutex hashmap, {label}"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                now += STEP;
                let mut map = baseline.lock().unwrap_or_else(|p| p.into_inner());
                black_box(map.entry(keys[i]).or_default().acquire(now, QUOTA, 0))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
