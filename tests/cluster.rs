//! Several proxies, one budget: the shared limiter against a real `redis-server` the test starts
//! on a free loopback port (stopped by PID), in front of one stand-in on a thread of its own.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::redis::RedisServer;
use support::*;
use tmdb_proxy::sim::{Sim, max_in_window};
use tokio::time::Instant;

/// `n` proxies on one Redis, in front of `sim`, with `toml` added to their configuration.
async fn replicas(
    n: usize,
    redis: &RedisServer,
    sim: &tmdb_proxy::sim::Sim,
    toml: &str,
) -> Vec<Running> {
    let mut proxies = Vec::new();
    for _ in 0..n {
        let text = format!(
            "[cluster]\nredis_url = \"{}\"\nnamespace = \"t\"\n{toml}",
            redis.url()
        );
        proxies.push(spawn_proxy(&text, &sim.url()).await);
    }
    proxies
}

/// Pushes `path` through every proxy with `per_proxy` clients each for `run`; counts answers by
/// status.
async fn push(
    proxies: &[Running],
    paths: &[&str],
    per_proxy: usize,
    run: Duration,
) -> HashMap<u16, usize> {
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..600).map(|_| AtomicUsize::new(0)).collect());
    let until = Instant::now() + run;
    let mut tasks = Vec::new();
    for proxy in proxies {
        for i in 0..per_proxy {
            let url = proxy.url(paths[i % paths.len()]);
            let counts = counts.clone();
            tasks.push(tokio::spawn(async move {
                let client = http1_client();
                while Instant::now() < until {
                    let status = get(&client, &url).await.status.as_u16();
                    counts[usize::from(status).min(599)].fetch_add(1, Ordering::Relaxed);
                    if status != 200 {
                        // A refused client backs off a little, as real ones do.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    (0..600)
        .filter_map(|s| {
            let n = counts[s].load(Ordering::Relaxed);
            (n > 0).then_some((s as u16, n))
        })
        .collect()
}

fn arrivals_of(sim: &Sim, credential: &str) -> Vec<tokio::time::Instant> {
    (sim.arrivals().iter())
        .filter(|a| a.credential.as_deref() == Some(credential))
        .map(|a| a.at)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_on_one_redis_keep_one_keys_budget() {
    let redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder());
    let proxies = replicas(3, &redis, &sim, "[limit]\nrequests_per_second = 20\n").await;
    let run = Duration::from_secs(3);
    let answers = push(&proxies, &["/3/movie/1?api_key=SHARED"], 8, run).await;
    let times = arrivals_of(&sim, "SHARED");
    let worst = max_in_window(&times, Duration::from_secs(1));
    assert!(
        worst <= 20,
        "{worst} arrivals in one second; answers {answers:?}"
    );
    // Together they get nearly the whole budget: 20 per 1.05 s.
    let span = times
        .iter()
        .max()
        .unwrap()
        .duration_since(*times.iter().min().unwrap());
    let rate = times.len() as f64 / span.as_secs_f64().max(1.0);
    assert!(
        rate >= 0.85 * 20.0,
        "{rate:.1}/s over {span:?}; answers {answers:?}"
    );
    for proxy in &proxies {
        let ready = get(&http1_client(), &proxy.url("/3/movie/2?api_key=OTHER")).await;
        assert_eq!(ready.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_ceiling_holds_across_proxies_and_keys() {
    let redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder());
    let toml =
        "[limit]\nrequests_per_second = 20\nglobal_requests_per_second = 25\nmode = \"reject\"\n";
    let proxies = replicas(3, &redis, &sim, toml).await;
    let paths = ["/3/movie/1?api_key=KEY_A", "/3/movie/1?api_key=KEY_B"];
    let answers = push(&proxies, &paths, 6, Duration::from_secs(3)).await;
    let all: Vec<_> = sim.arrivals().iter().map(|a| a.at).collect();
    let worst = max_in_window(&all, Duration::from_secs(1));
    assert!(
        worst <= 25,
        "{worst} arrivals in one second across keys; {answers:?}"
    );
    for key in ["KEY_A", "KEY_B"] {
        let worst = max_in_window(&arrivals_of(&sim, key), Duration::from_secs(1));
        assert!(worst <= 20, "{key}: {worst} in one second");
    }
    assert!(
        all.len() >= 60,
        "{} admitted in 3 s; {answers:?}",
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_through_one_proxy_pauses_the_key_on_the_others() {
    let redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder().route(
        "/3/limited",
        tmdb_proxy::sim::Route::with_headers(429, &[("retry-after", "3")], r#"{"status_code":25}"#),
    ));
    let proxies = replicas(3, &redis, &sim, "[limit]\nmode = \"reject\"\n").await;
    let client = http1_client();
    let limited = get(&client, &proxies[0].url("/3/limited?api_key=PAUSED")).await;
    assert_eq!(limited.status, 429);
    // The pause is in Redis: the other proxies refuse the key at once, sending nothing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = sim.hits();
    for proxy in &proxies[1..] {
        let refused = get(&client, &proxy.url("/3/movie/1?api_key=PAUSED")).await;
        assert_eq!(refused.status, 429, "{}", refused.text());
        assert!(refused.text().contains(r#""status_code":25"#));
        let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=3).contains(&retry), "retry-after {retry}");
    }
    assert_eq!(
        sim.hits(),
        before,
        "nothing was forwarded for the paused key"
    );
    // Other keys are not paused.
    assert_eq!(
        get(&client, &proxies[1].url("/3/movie/1?api_key=FREE"))
            .await
            .status,
        200
    );
}
