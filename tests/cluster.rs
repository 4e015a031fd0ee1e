//! Several proxies, one budget: the shared limiter against a real `redis-server` the test starts
//! on a free loopback port (stopped by PID), in front of one stand-in on a thread of its own.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::redis::{RedisCluster, RedisServer};
use support::*;
use tmdb_proxy::sim::{Sim, max_in_window};
use tokio::time::Instant;

/// `n` proxies on one Redis, in front of `sim`: `cluster` is added to their `[cluster]`
/// section, `toml` after it.
async fn replicas(
    n: usize,
    redis: &RedisServer,
    sim: &Sim,
    cluster: &str,
    toml: &str,
) -> Vec<Running> {
    let mut proxies = Vec::new();
    for _ in 0..n {
        let text = format!(
            "[cluster]\nredis_url = \"{}\"\nnamespace = \"t\"\n{cluster}\n{toml}",
            redis.url()
        );
        proxies.push(spawn_proxy(&text, &sim.url()).await);
    }
    proxies
}

/// What clients pushing through the proxies got.
#[derive(Debug, Default)]
struct Load {
    /// Answers by status.
    answers: HashMap<u16, usize>,
    /// The longest any request took.
    slowest: Duration,
}

/// Pushes `paths` through every proxy with `per_proxy` clients each for `run`.
fn push(
    proxies: &[Running],
    paths: &[&str],
    per_proxy: usize,
    run: Duration,
) -> tokio::task::JoinHandle<Load> {
    let until = Instant::now() + run;
    let mut tasks = Vec::new();
    for proxy in proxies {
        for i in 0..per_proxy {
            let url = proxy.url(paths[i % paths.len()]);
            tasks.push(tokio::spawn(async move {
                let (client, mut load) = (http1_client(), Load::default());
                while Instant::now() < until {
                    let sent = Instant::now();
                    let status = get(&client, &url).await.status.as_u16();
                    load.slowest = load.slowest.max(sent.elapsed());
                    *load.answers.entry(status).or_default() += 1;
                    if status != 200 {
                        // A refused client backs off a little, as real ones do.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                load
            }));
        }
    }
    tokio::spawn(async move {
        let mut total = Load::default();
        for task in tasks {
            let load = task.await.unwrap();
            total.slowest = total.slowest.max(load.slowest);
            for (status, n) in load.answers {
                *total.answers.entry(status).or_default() += n;
            }
        }
        total
    })
}

/// Waits (up to 10 s) until every proxy's readiness says `body`.
async fn all_become(proxies: &[Running], body: &str) -> bool {
    eventually(Duration::from_secs(10), || {
        proxies.iter().all(|p| p.proxy.readiness().1 == body)
    })
    .await
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
    let proxies = replicas(3, &redis, &sim, "", "[limit]\nrequests_per_second = 20\n").await;
    let run = Duration::from_secs(3);
    let answers = push(&proxies, &["/3/movie/1?api_key=SHARED"], 8, run)
        .await
        .unwrap()
        .answers;
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
    let metrics = proxies[0].proxy.render_metrics();
    for line in [
        "tmdb_proxy_budget_mode{mode=\"shared\"} 1",
        "tmdb_proxy_budget_mode{mode=\"local\"} 0",
        "tmdb_proxy_redis_calls_total{result=\"ok\"} ",
        "tmdb_proxy_redis_call_duration_seconds_count ",
        "tmdb_proxy_shared_tokens_total{action=\"granted\"} ",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    assert!(!metrics.contains("SHARED"), "no key in the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_ceiling_holds_across_proxies_and_keys() {
    let redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder());
    let toml =
        "[limit]\nrequests_per_second = 20\nglobal_requests_per_second = 25\nmode = \"reject\"\n";
    let proxies = replicas(3, &redis, &sim, "", toml).await;
    let paths = ["/3/movie/1?api_key=KEY_A", "/3/movie/1?api_key=KEY_B"];
    let answers = push(&proxies, &paths, 6, Duration::from_secs(3))
        .await
        .unwrap()
        .answers;
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
    let proxies = replicas(3, &redis, &sim, "", "[limit]\nmode = \"reject\"\n").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_every_request_is_answered_and_the_shares_hold() {
    let mut redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder());
    let limit = "[limit]\nrequests_per_second = 30\nmode = \"reject\"\n";
    let proxies = replicas(3, &redis, &sim, "expected_replicas = 3", limit).await;
    let load = push(
        &proxies,
        &["/3/movie/1?api_key=SHARED"],
        4,
        Duration::from_secs(5),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.kill();
    assert!(all_become(&proxies, "ready\nbudget: local (Redis does not answer)\n").await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    assert!(all_become(&proxies, "ready\nbudget: shared\n").await);
    let load = load.await.unwrap();
    // Forwarded or refused with TMDB's 429, nothing else, and never slowed down by Redis.
    assert!(
        load.answers.keys().all(|s| [200, 429].contains(s)),
        "{load:?}"
    );
    assert!(load.slowest < Duration::from_millis(300), "{load:?}");
    // Through the outage and the return: never more than N in a second at the upstream.
    let times = arrivals_of(&sim, "SHARED");
    let worst = max_in_window(&times, Duration::from_secs(1));
    assert!(worst <= 30, "{worst} arrivals in one second; {load:?}");
    assert!(
        load.answers.get(&200).copied().unwrap_or(0) >= 60,
        "{load:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_opens_the_breaker_and_requests_stay_fast() {
    let redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder());
    let proxies = replicas(1, &redis, &sim, "", "[limit]\nmode = \"reject\"\n").await;
    let client = http1_client();
    assert_eq!(
        get(&client, &proxies[0].url("/3/movie/1?api_key=K"))
            .await
            .status,
        200
    );
    // Every command, scripts included, waits for 2 s.
    assert!(
        redis
            .command("CLIENT PAUSE 2000 ALL")
            .unwrap()
            .starts_with("+OK")
    );
    let load = push(
        &proxies,
        &["/3/movie/1?api_key=K"],
        4,
        Duration::from_millis(1500),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        proxies[0].proxy.readiness(),
        (true, "ready\nbudget: local (Redis does not answer)\n")
    );
    let load = load.await.unwrap();
    assert!(
        load.answers.keys().all(|s| [200, 429].contains(s)),
        "{load:?}"
    );
    assert!(load.slowest < Duration::from_millis(300), "{load:?}");
    assert!(all_become(&proxies, "ready\nbudget: shared\n").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_without_redis_serves_its_share_then_joins() {
    let port = support::redis::free_port();
    let sim = sim_on_own_thread(Sim::builder());
    let toml = format!(
        "[cluster]\nredis_url = \"redis://127.0.0.1:{port}\"\nrequire_redis = true\n\
         [limit]\nrequests_per_second = 10\n"
    );
    let proxy = spawn_proxy(&toml, &sim.url()).await;
    let client = http1_client();
    // Served on the local share (after waiting out one window, in queue mode).
    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=K"))
            .await
            .status,
        200
    );
    let local = "not ready\nbudget: local (Redis does not answer; cluster.require_redis is on)\n";
    assert_eq!(proxy.proxy.readiness(), (false, local));
    let _redis = RedisServer::start_on(port, &[]);
    let proxies = [proxy];
    assert!(all_become(&proxies, "ready\nbudget: shared\n").await);
    assert_eq!(
        get(&client, &proxies[0].url("/3/movie/1?api_key=K"))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_window_holds_across_three_proxies() {
    let cluster = RedisCluster::start();
    let sim = sim_on_own_thread(Sim::builder());
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let toml = format!(
        "[cluster]\ncluster_nodes = [{}]\n[limit]\nrequests_per_second = 20\n",
        nodes.join(", ")
    );
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(spawn_proxy(&toml, &sim.url()).await);
    }
    assert!(all_become(&proxies, "ready\nbudget: shared\n").await);
    // Keys whose hash tags land on different nodes.
    let paths = [
        "/3/movie/1?api_key=KEY_1",
        "/3/movie/1?api_key=KEY_2",
        "/3/movie/1?api_key=KEY_3",
    ];
    let load = push(&proxies, &paths, 6, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(
        load.answers.keys().all(|s| [200, 429].contains(s)),
        "{load:?}"
    );
    for key in ["KEY_1", "KEY_2", "KEY_3"] {
        let times = arrivals_of(&sim, key);
        let worst = max_in_window(&times, Duration::from_secs(1));
        assert!(worst <= 20, "{key}: {worst} in one second; {load:?}");
        assert!(
            times.len() >= 40,
            "{key}: {} admitted in 3 s; {load:?}",
            times.len()
        );
    }
    // The budget really lived in the cluster: its nodes hold the keys' logs between them.
    let held: usize = (cluster.nodes.iter())
        .map(|n| {
            n.command_text("DBSIZE")
                .trim_start_matches(':')
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum();
    assert!(held >= 3, "{held} keys in the cluster");
}

/// `tmdb-proxy check` with `url` as the Redis URL: its whole output.
fn check_with_redis(url: &str) -> String {
    check_with_redis_env(url, &[])
}

fn check_with_redis_env(url: &str, env: &[(&str, &std::path::Path)]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tmdb-proxy"))
        .args(["--config", "config/tmdb-proxy.toml", "check"])
        .env("TMDB_PROXY__CLUSTER__REDIS_URL", url)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_whether_redis_takes_the_password_and_never_prints_it() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret-pass"]);
    let good = check_with_redis(&format!("redis://:s3cret-pass@127.0.0.1:{}", redis.port));
    assert!(
        good.contains("accepted the credentials and runs the budget script"),
        "{good}"
    );
    let bad = check_with_redis(&format!("redis://:wrong-pass@127.0.0.1:{}", redis.port));
    assert!(bad.contains("warning: Redis"), "{bad}");
    for output in [&good, &bad] {
        assert!(
            !output.contains("s3cret") && !output.contains("wrong-pass"),
            "{output}"
        );
        assert!(output.contains("redis://<redacted>@127.0.0.1"), "{output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_over_tls_is_reached_with_rediss_and_its_certificate_checked() {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("tmdb-proxy-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let tls_port = support::redis::free_port();
    let _redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    // Trusted through SSL_CERT_FILE, as a private CA would be.
    let trusted = check_with_redis_env(&url, &[("SSL_CERT_FILE", &cert)]);
    assert!(trusted.contains("runs the budget script"), "{trusted}");
    // Not trusted: refused, and the proxy would serve on its local share.
    let untrusted = check_with_redis(&url);
    assert!(untrusted.contains("warning: Redis"), "{untrusted}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_leaves_on_time_costs_one_redis_call() {
    let redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder());
    let proxies = replicas(1, &redis, &sim, "", "").await;
    assert!(all_become(&proxies, "ready\nbudget: shared\n").await);
    let calls = || {
        let figures = proxies[0].proxy.budget().shared().unwrap().figures();
        figures.calls_ok + figures.calls_failed + figures.calls_timed_out
    };
    let before = calls();
    let client = http1_client();
    for i in 0..20 {
        let url = proxies[0].url(&format!("/3/movie/1?api_key=ONCE{i}"));
        assert_eq!(get(&client, &url).await.status, 200);
    }
    // One acquire each; the upkeep's probe does not run while Redis answers.
    assert_eq!(calls() - before, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_share_the_shared_budget_by_weight_across_replicas() {
    let redis = RedisServer::start();
    let sim = sim_on_own_thread(Sim::builder());
    let apps = "[limit]\nrequests_per_second = 20\n\
        [[clients.apps]]\nname = \"big\"\ntoken = \"big-token\"\napi_key = \"APPKEY\"\nshare = 3\n\
        [[clients.apps]]\nname = \"small\"\ntoken = \"small-token\"\napi_key = \"APPKEY\"\n";
    let proxies = replicas(2, &redis, &sim, "", apps).await;
    let until = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for proxy in &proxies {
        for (token, app) in [("big-token", "big"), ("small-token", "small")] {
            for _ in 0..6 {
                let url = proxy.url(&format!("/3/movie/1?app={app}"));
                tasks.push(tokio::spawn(async move {
                    let client = http1_client();
                    while Instant::now() < until {
                        let reply = get_with(&client, &url, &[("x-proxy-token", token)]).await;
                        if reply.status != 200 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }));
            }
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let arrivals = sim.arrivals();
    let times: Vec<Instant> = arrivals.iter().map(|a| a.at).collect();
    let worst = max_in_window(&times, Duration::from_secs(1));
    assert!(worst <= 20, "{worst} arrivals in one second");
    assert!(
        arrivals
            .iter()
            .all(|a| a.credential.as_deref() == Some("APPKEY"))
    );
    let start = *times.iter().min().unwrap();
    let after = |app: &str| {
        arrivals
            .iter()
            .filter(|a| a.query.as_deref().is_some_and(|q| q.contains(app)))
            .filter(|a| a.at.duration_since(start) >= Duration::from_secs(1))
            .count()
    };
    let (big, small) = (after("app=big"), after("app=small"));
    let share = big as f64 / (big + small) as f64;
    // Each replica shares what the shared budget grants it, so the split is each replica's
    // 3:1 of its own part: close to 75%, less exact than within one process.
    assert!(
        (0.65..=0.85).contains(&share),
        "big {big}, small {small}: {share:.3}"
    );
}
