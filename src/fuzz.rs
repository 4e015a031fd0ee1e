//! Seeded random cases for the property and robustness tests (test builds only).
//!
//! `cargo test` replays a fixed list of seeds, so it is deterministic and fast. With
//! `TMDB_PROXY_FUZZ_SECONDS=N` set, each such test instead runs fresh seeds, from a base taken
//! from the clock, until N seconds are spent: `.ci/run` does this for a bounded time. A failing
//! case is reported with its seed, and `for_each_seed` replays it given that seed as the default.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The environment variable that turns replay into a timed run of fresh seeds.
const SECONDS_VAR: &str = "TMDB_PROXY_FUZZ_SECONDS";

/// A small deterministic generator (splitmix64), so a failing case is replayed from its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Runs `case` for each seed of `replay`, or, under `TMDB_PROXY_FUZZ_SECONDS`, for fresh seeds
/// until that time is spent. A panicking case is re-raised with its seed in the message.
pub(crate) fn for_each_seed(name: &str, replay: Range<u64>, mut case: impl FnMut(u64)) {
    let budget = std::env::var(SECONDS_VAR)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut run = |seed: u64| {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| case(seed))) {
            eprintln!(
                "{name}: seed {seed} failed; replay it with for_each_seed({seed}..{})",
                seed + 1
            );
            resume_unwind(panic);
        }
    };
    let Some(budget) = budget else {
        replay.for_each(run);
        return;
    };
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let start = Instant::now();
    let mut cases = 0u64;
    while start.elapsed() < budget {
        run(base.wrapping_add(cases));
        cases += 1;
    }
    eprintln!("{name}: {cases} cases from seed {base} in {budget:?}");
}
