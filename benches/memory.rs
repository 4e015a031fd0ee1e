//! Memory of the limiter under a flood of distinct keys.
//!
//! 1. Bytes per live bucket: 200,000 keys admitted once each, resident memory growth (allocator
//!    overhead and the map's spare capacity included) divided by buckets.
//! 2. A flood of 1,000,000 distinct keys at full speed through the limiter with the shipped
//!    defaults (idle buckets swept every second, at most 100,000 keys): peak and final resident
//!    memory of the process, the most buckets ever held, and how many newcomers the cap refused.
//!
//! Run: `cargo bench --bench memory` (Linux: reads /proc/self/status).

// A benchmark reports on stdout.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tmdb_proxy::Config;
use tmdb_proxy::limiter::{Budget, Key, LocalBudget, Policy};

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn limiter(toml: &str) -> Arc<LocalBudget> {
    let cfg = Config::from_toml_str(toml).expect("valid config");
    Arc::new(LocalBudget::new(Policy::new(&cfg.limit, Key::of)))
}

/// One request's decisions for a new key: a token, then its confirmation at departure.
async fn admit(l: &LocalBudget, i: u64) -> bool {
    let key = Key::of(&format!("flood-{i:07}"));
    match l.acquire(key, Instant::now(), Duration::ZERO).await {
        Ok(mut grant) => l.confirm(&mut grant, Instant::now()).await.is_ok(),
        Err(_) => false,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // 1. Bytes per live bucket (no cap, no sweep during the fill).
        let l = limiter("[limit]\nmax_keys = 0\nsweep_interval = \"1h\"\n");
        let before = status_kib("VmRSS:");
        const LIVE: u64 = 200_000;
        for i in 0..LIVE {
            admit(&l, i).await;
        }
        let grown = status_kib("VmRSS:").saturating_sub(before) * 1024;
        let per_bucket = grown as f64 / l.tracked_keys() as f64;
        drop(l);

        // 2. The flood, with the shipped defaults and the sweeper running.
        let l = limiter("");
        let sweeper = LocalBudget::spawn_sweeper(&l, Duration::from_secs(1));
        const FLOOD: u64 = 1_000_000;
        let started = Instant::now();
        let mut refused = 0u64;
        let mut most_keys = 0usize;
        for i in 0..FLOOD {
            if !admit(&l, LIVE + i).await {
                refused += 1;
            }
            if i % 10_000 == 0 {
                most_keys = most_keys.max(l.tracked_keys());
                tokio::task::yield_now().await;
            }
        }
        let elapsed = started.elapsed();
        let peak_rss = status_kib("VmHWM:");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let after_rss = status_kib("VmRSS:");
        let left = l.tracked_keys();
        sweeper.abort();

        println!("| measure | value |");
        println!("|---|---|");
        println!("| resident bytes per live bucket (200,000 keys) | {per_bucket:.0} |");
        println!(
            "| flood of 1,000,000 distinct keys | {:.1} s ({:.0} keys/s) |",
            elapsed.as_secs_f64(),
            FLOOD as f64 / elapsed.as_secs_f64()
        );
        println!("| most buckets held during the flood | {most_keys} |");
        println!("| new keys refused by max_keys | {refused} |");
        println!(
            "| peak RSS of this process (VmHWM) | {:.1} MiB |",
            peak_rss as f64 / 1024.0
        );
        println!(
            "| RSS 2.5 s after the flood | {:.1} MiB ({left} buckets left) |",
            after_rss as f64 / 1024.0
        );
    });
}
