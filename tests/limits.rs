//! The per-key limit, measured where it matters: at the upstream.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;
use tmdb_proxy::sim::{Arrival, SimConfig, max_in_window};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const ONE_SECOND: Duration = Duration::from_secs(1);

fn arrivals_by_credential(arrivals: &[Arrival]) -> HashMap<String, Vec<Instant>> {
    let mut by_key: HashMap<String, Vec<Instant>> = HashMap::new();
    for a in arrivals {
        by_key
            .entry(a.credential.clone().unwrap_or_default())
            .or_default()
            .push(a.at);
    }
    by_key
}

/// Fires `n` concurrent GETs at `urls` (round-robin) and returns every reply.
async fn burst(client: &TestClient, urls: &[String], n: usize) -> Vec<Reply> {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, url) = (client.clone(), urls[i % urls.len()].clone());
        tasks.push(tokio::spawn(async move { get(&client, &url).await }));
    }
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

/// 300 concurrent requests: the upstream never sees a one-second window over the ceiling, and
/// every surplus request gets the exact code-25 body with Retry-After.
async fn check_concurrent_burst(client: TestClient, keys: &[&str]) {
    // TMDB's own limit enforced by the stand-in too: any overshoot would show as an upstream 429.
    let sim = sim_with(SimConfig {
        rate_limit: Some(50),
        ..SimConfig::default()
    })
    .await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 50\nmode = \"queue\"\nmax_wait = \"2s\"\n",
        &sim.url(),
    )
    .await;
    let urls: Vec<String> = keys
        .iter()
        .map(|k| proxy.url(&format!("/3/movie/550?api_key={k}")))
        .collect();
    let replies = burst(&client, &urls, 300).await;

    let ok = replies.iter().filter(|r| r.status == 200).count();
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_code_25(reply, 50);
    }
    let by_key = arrivals_by_credential(&sim.arrivals());
    assert_eq!(by_key.len(), keys.len());
    for (key, times) in &by_key {
        let worst = max_in_window(times, ONE_SECOND);
        assert!(worst <= 50, "key {key}: {worst} arrivals in one second");
    }
    assert_eq!(
        ok,
        sim.hits(),
        "every admitted request reached the upstream once"
    );
    // Queue mode with a 2 s wait serves more than one second's worth per key.
    assert!(ok >= keys.len() * 51, "only {ok} served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_for_one_key_http1() {
    check_concurrent_burst(http1_client(), &["ONEKEY"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_for_three_keys_http2() {
    check_concurrent_burst(h2_client(), &["KEY_A", "KEY_B", "KEY_C"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_overload_is_admitted_at_over_90_percent_of_the_limit() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 20\nmode = \"queue\"\nmax_wait = \"300ms\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let url = proxy.url("/3/movie/1?api_key=SUSTAINED");
    // 40 clients, each sending back to back for 4.5 s: far more than 20/s.
    let deadline = Instant::now() + Duration::from_millis(4500);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let reply = get(&client, &url).await;
                if reply.status == 429 {
                    // Honour Retry-After loosely: a short pause keeps this loop from spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let times: Vec<Instant> = sim.arrivals().iter().map(|a| a.at).collect();
    assert!(max_in_window(&times, ONE_SECOND) <= 20);
    // After the opening burst, every 2-second stretch (at any offset) admits at least 90% of
    // the 40 requests that 20/s allows.
    let first = *times.iter().min().unwrap();
    for offset_ms in [1100, 1337, 1500, 1789, 2000, 2222] {
        let from = first + Duration::from_millis(offset_ms);
        let to = from + Duration::from_secs(2);
        let steady = times.iter().filter(|&&t| t >= from && t < to).count();
        assert!(
            steady >= 36,
            "{steady} admitted in the 2 s from +{offset_ms} ms (want >= 36 of 40)"
        );
    }
}

#[tokio::test]
async fn queue_mode_serves_a_modest_burst_without_429() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 10\nmode = \"queue\"\nmax_wait = \"2s\"\n",
        &sim.url(),
    )
    .await;
    let replies = burst(&http1_client(), &[proxy.url("/3/movie/1?api_key=Q")], 15).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(sim.hits(), 15);
}

#[tokio::test]
async fn reject_mode_answers_429_at_once() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 10\nmode = \"reject\"\n",
        &sim.url(),
    )
    .await;
    let started = Instant::now();
    let replies = burst(&http1_client(), &[proxy.url("/3/movie/1?api_key=R")], 15).await;
    // Nothing waited for a token: the whole burst is answered well inside one window.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(replies.iter().filter(|r| r.status == 200).count(), 10);
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_code_25(reply, 10);
    }
    assert_eq!(sim.hits(), 10);
}

#[tokio::test]
async fn queue_mode_rejects_at_once_when_the_wait_would_exceed_max_wait() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 2\nmode = \"queue\"\nmax_wait = \"500ms\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let url = proxy.url("/3/movie/1?api_key=W");
    for _ in 0..2 {
        assert_eq!(get(&client, &url).await.status, 200);
    }
    let started = Instant::now();
    let reply = get(&client, &url).await;
    assert_code_25(&reply, 2);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "answered without waiting"
    );
}

#[tokio::test]
async fn bearer_requests_are_limited_like_api_key_ones() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 3\nmode = \"reject\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let url = proxy.url("/3/movie/1");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let reply = get_with(&client, &url, &[("authorization", "Bearer opaque-token-1")]).await;
        statuses.push(reply.status.as_u16());
        if reply.status == 429 {
            assert_code_25(&reply, 3);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Another token has its own budget.
    let other = get_with(&client, &url, &[("authorization", "Bearer opaque-token-2")]).await;
    assert_eq!(other.status, 200);
    assert_eq!(
        sim.arrivals()[0].headers["authorization"],
        "Bearer opaque-token-1"
    );
}

#[tokio::test]
async fn jwt_with_aud_shares_the_api_key_bucket() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 2\nmode = \"reject\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let token = jwt_with_aud("ACCOUNTKEY");
    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=ACCOUNTKEY"))
            .await
            .status,
        200
    );
    let bearer = format!("Bearer {token}");
    let v4 = get_with(
        &client,
        &proxy.url("/3/movie/2"),
        &[("authorization", bearer.as_str())],
    )
    .await;
    assert_eq!(v4.status, 200);
    // Two spent between v3 and v4: the account's third request is refused either way.
    assert_eq!(
        get(&client, &proxy.url("/3/movie/3?api_key=ACCOUNTKEY"))
            .await
            .status,
        429
    );
    let v4 = get_with(
        &client,
        &proxy.url("/4/list/1"),
        &[("authorization", bearer.as_str())],
    )
    .await;
    assert_code_25(&v4, 2);
    // A token for another account is unaffected.
    let other = format!("Bearer {}", jwt_with_aud("OTHERKEY"));
    assert_eq!(
        get_with(
            &client,
            &proxy.url("/3/movie/4"),
            &[("authorization", other.as_str())]
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn a_disconnected_waiter_does_not_consume_a_token() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 1\nmode = \"queue\"\nmax_wait = \"1500ms\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let url = proxy.url("/3/movie/1?api_key=WAITER");
    assert_eq!(get(&client, &url).await.status, 200);

    // A client queues for the next token (about 1.05 s away), then hangs up.
    let mut quitter = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    quitter
        .write_all(b"GET /3/movie/2?api_key=WAITER HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(quitter);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Had the quitter kept its slot, this request's token would be 2.1 s away, beyond max_wait,
    // and it would be refused at once. Its slot was given back, so this one waits and is served.
    let reply = get(&client, &proxy.url("/3/movie/3?api_key=WAITER")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let paths: Vec<String> = sim.arrivals().iter().map(|a| a.path.clone()).collect();
    assert_eq!(paths, ["/3/movie/1", "/3/movie/3"]);
}

fn header_u64(reply: &Reply, name: &str) -> u64 {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a whole number"))
}

/// Pulls `r` and `t` out of `"per-key";r=N;t=N`.
fn ratelimit_fields(reply: &Reply) -> (u64, u64) {
    let value = reply.header("ratelimit").expect("RateLimit present");
    let mut r = None;
    let mut t = None;
    for param in value.split(';') {
        if let Some(v) = param.strip_prefix("r=") {
            r = v.parse().ok();
        }
        if let Some(v) = param.strip_prefix("t=") {
            t = v.parse().ok();
        }
    }
    (r.expect("r="), t.expect("t="))
}

#[tokio::test]
async fn rate_limit_headers_on_every_keyed_response_and_no_legacy_by_default() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 3\nmode = \"reject\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let url = proxy.url("/3/movie/1?api_key=H");
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let reply = get(&client, &url).await;
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"per-key\";q=3;w=1")
        );
        let (r, t) = ratelimit_fields(&reply);
        remaining.push(r);
        if reply.status == 429 {
            assert_eq!(t, header_u64(&reply, "retry-after"));
        } else if r > 0 {
            assert_eq!(t, 0);
        }
        for legacy in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert!(
                reply.header(legacy).is_none(),
                "{legacy} sent without legacy_headers"
            );
        }
    }
    assert_eq!(remaining, [2, 1, 0, 0]);
}

#[tokio::test]
async fn legacy_headers_when_enabled() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 2\nmode = \"reject\"\nlegacy_headers = true\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let url = proxy.url("/3/movie/1?api_key=L");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    for expected_remaining in [1, 0, 0] {
        let before = now();
        let reply = get(&client, &url).await;
        assert_eq!(header_u64(&reply, "x-ratelimit-limit"), 2);
        assert_eq!(
            header_u64(&reply, "x-ratelimit-remaining"),
            expected_remaining
        );
        let (r, _) = ratelimit_fields(&reply);
        assert_eq!(r, expected_remaining);
        let reset = header_u64(&reply, "x-ratelimit-reset");
        // Reset is a whole epoch second, rounded up: never in the past.
        assert!(reset >= before, "reset {reset} before {before}");
        assert!(reset <= now() + 3, "reset {reset} too far out");
        if reply.status == 429 {
            assert!(reset > before);
        }
    }
}

#[tokio::test]
async fn idle_buckets_are_dropped() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 5\nsweep_interval = \"100ms\"\nwindow_margin = \"10ms\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    for i in 0..40 {
        assert_eq!(
            get(&client, &proxy.url(&format!("/3/movie/1?api_key=IDLE{i}")))
                .await
                .status,
            200
        );
    }
    assert!(proxy.proxy.limiter().active_keys() > 0);
    let limiter = proxy.proxy.limiter();
    assert!(
        eventually(Duration::from_secs(10), || limiter.active_keys() == 0).await,
        "{} buckets left",
        limiter.active_keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_behind_a_small_pool_never_sees_a_burst() {
    // Requests wait for one of two connections for longer than the stamp tolerance, so their
    // tokens are re-stamped (or re-queued) when they finally leave.
    let sim = sim_with(SimConfig {
        latency: Duration::from_millis(150),
        ..SimConfig::default()
    })
    .await;
    let proxy = spawn_proxy(
        "[upstream]\nmax_connections = 2\n[limit]\nrequests_per_second = 8\nmax_wait = \"10s\"\n",
        &sim.url(),
    )
    .await;
    let replies = burst(
        &http1_client(),
        &[proxy.url("/3/movie/1?api_key=SLOWPOOL")],
        30,
    )
    .await;
    let served = replies.iter().filter(|r| r.status == 200).count();
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_code_25(reply, 8);
    }
    let times: Vec<Instant> = sim.arrivals().iter().map(|a| a.at).collect();
    assert_eq!(times.len(), served);
    assert!(max_in_window(&times, ONE_SECOND) <= 8);
    // Two connections at 150 ms each carry about 13 requests a second: the pool, not the
    // limit, is the bottleneck, and most of the burst is still served within max_wait.
    assert!(served >= 20, "only {served} served");
}

#[tokio::test]
async fn two_different_api_keys_in_one_query_are_refused() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let reply = get(
        &http1_client(),
        &proxy.url("/3/movie/1?api_key=A&api_key=B"),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["status_code"], 47);
    assert_eq!(sim.hits(), 0);
}

#[tokio::test]
async fn keyed_requests_refused_locally_still_carry_rate_limit_fields() {
    let sim = sim().await;
    let proxy = spawn_proxy("[limit]\nrequests_per_second = 5\n", &sim.url()).await;
    let client = http1_client();
    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=F"))
            .await
            .status,
        200
    );
    let refused = get(&client, &proxy.url("/3/movie/1?api_key=F&page=0")).await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"per-key\";q=5;w=1")
    );
    assert_eq!(ratelimit_fields(&refused), (4, 0));
}
