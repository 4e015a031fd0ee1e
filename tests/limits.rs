//! The per-key limit, measured where it matters: at the upstream.
//!
//! Most tests call the proxy in-process on paused tokio time ([`InProcess`]): the stand-in
//! records each arrival on the same clock, so queue turns, `Retry-After`, pauses and pacing are
//! asserted to the nanosecond. Two bursts go through the real server over HTTP/1.1 and HTTP/2.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;
use tmdb_proxy::sim::{Arrival, Sim, max_in_window};
use tokio::time::Instant;

const ONE_SECOND: Duration = Duration::from_secs(1);
/// The default window: one second plus the 50 ms margin.
const WINDOW: Duration = Duration::from_millis(1050);
const MS: Duration = Duration::from_millis(1);

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

/// Fires `n` concurrent GETs at `urls` (round-robin) over real sockets and returns every reply.
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

/// `n` concurrent in-process GETs of `path`; every reply, in order of sending.
async fn burst_in_process(harness: &InProcess, path: &str, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n).map(|_| harness.spawn_get(path)).collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status.as_u16()).collect()
}

/// 300 concurrent requests through the server: the upstream never sees a one-second window over
/// the ceiling, and every surplus request gets the exact code-25 body with Retry-After.
async fn check_concurrent_burst(client: TestClient, keys: &[&str]) {
    // TMDB's own limit enforced by the stand-in too: any overshoot would show as an upstream 429.
    // The stand-in runs on a runtime of its own, so its arrival clock does not wait behind the
    // proxy's and the clients' tasks. It still shares two cores with them and the other tests:
    // under that load its clock can lag the proxy's by more than the default 50 ms margin
    // (README, "What the margin covers"), so this test gives it 100.
    let sim = sim_on_own_thread(Sim::builder().rate_limit(Some(50)));
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 50\nmode = \"queue\"\nmax_wait = \"2s\"\n\
         window_margin = \"100ms\"\n",
        &sim.url(),
    )
    .await;
    let urls: Vec<String> = keys
        .iter()
        .map(|k| proxy.url(&format!("/3/movie/550?api_key={k}")))
        .collect();
    // One request first (refused locally, it reaches nothing): an HTTP/2 client then knows the
    // proxy's stream limit and queues the burst's streams beyond it instead of having them refused.
    assert_eq!(get(&client, &proxy.url("/")).await.status, 404);
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

#[tokio::test(start_paused = true)]
async fn reject_mode_answers_the_surplus_at_once_with_the_time_until_a_token_is_back() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 10\nmode = \"reject\"\n",
        sim().await,
    );
    let start = Instant::now();
    let replies = burst_in_process(&harness, "/3/movie/1?api_key=R", 15).await;
    assert_eq!(start.elapsed(), Duration::ZERO, "nothing waited");
    assert_eq!(statuses(&replies), [&[200; 10][..], &[429; 5]].concat());
    for reply in &replies[10..] {
        assert_code_25(reply, 10);
        // The burst's tokens come back one window (1.05 s) later: 2 s, rounded up.
        assert_eq!(reply.header("retry-after"), Some("2"));
        assert_eq!(reply.header("ratelimit"), Some("\"per-key\";r=0;t=2"));
    }
    assert_eq!(harness.arrivals_of("R"), [start; 10]);
    // Exactly one window later the key has its ten tokens again.
    tokio::time::advance(WINDOW - Duration::from_nanos(1)).await;
    assert_eq!(harness.get("/3/movie/1?api_key=R").await.status, 429);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert_eq!(harness.get("/3/movie/1?api_key=R").await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn queue_mode_sends_a_waiter_exactly_when_a_token_is_back() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 2\nmode = \"queue\"\nmax_wait = \"2s\"\n",
        sim().await,
    );
    let start = Instant::now();
    let replies = burst_in_process(&harness, "/3/movie/1?api_key=Q", 3).await;
    assert_eq!(statuses(&replies), [200, 200, 200]);
    assert_eq!(start.elapsed(), WINDOW);
    assert_eq!(harness.arrivals_of("Q"), [start, start, start + WINDOW]);
    assert_eq!(harness.proxy.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn queue_mode_refuses_at_once_when_the_wait_would_exceed_max_wait() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 2\nmode = \"queue\"\nmax_wait = \"500ms\"\n",
        sim().await,
    );
    for _ in 0..2 {
        assert_eq!(harness.get("/3/movie/1?api_key=W").await.status, 200);
    }
    let start = Instant::now();
    let reply = harness.get("/3/movie/1?api_key=W").await;
    assert_code_25(&reply, 2);
    assert_eq!(start.elapsed(), Duration::ZERO, "answered without waiting");
    assert_eq!(reply.header("retry-after"), Some("2"));
    assert_eq!(harness.sim.hits(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_departed_waiter_gives_its_turn_to_the_next_request() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 1\nmode = \"queue\"\nmax_wait = \"1500ms\"\n",
        sim().await,
    );
    let start = Instant::now();
    assert_eq!(harness.get("/3/movie/1?api_key=WAITER").await.status, 200);
    // A client queues for the next token (at 1.05 s), then goes away after 200 ms.
    let quitter = harness.spawn_get("/3/movie/2?api_key=WAITER");
    tokio::time::sleep(200 * MS).await;
    assert_eq!(harness.proxy.queued(), 1);
    quitter.abort();
    assert!(quitter.await.unwrap_err().is_cancelled());
    assert_eq!(harness.proxy.queued(), 0);
    // Had the quitter kept its turn, this request's would be 2.1 s away, beyond max_wait, and it
    // would be refused at once. It takes the quitter's turn instead.
    let reply = harness.get("/3/movie/3?api_key=WAITER").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(harness.arrived_paths(), ["/3/movie/1", "/3/movie/3"]);
    assert_eq!(harness.arrivals_of("WAITER"), [start, start + WINDOW]);
}

#[tokio::test(start_paused = true)]
async fn sustained_overload_is_served_as_a_paced_stream_at_the_full_rate() {
    // 21 per 1.05 s window: a token every 50 ms once paced.
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 21\nmode = \"queue\"\nmax_wait = \"300ms\"\n",
        sim().await,
    );
    let start = Instant::now();
    let deadline = start + Duration::from_millis(4500);
    // 40 clients, each sending back to back for 4.5 s (pausing 20 ms after a 429): far more
    // than the limit.
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let proxy = harness.proxy.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let req = http::Request::get("/3/movie/1?api_key=SUSTAINED")
                        .body(http_body_util::Empty::new())
                        .unwrap();
                    if call(&proxy, req).await.status == 429 {
                        tokio::time::sleep(20 * MS).await;
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let times = harness.arrivals_of("SUSTAINED");
    // The opening burst passes at once. After it the key is paced: each window's first three
    // tokens together (the pacing tolerance is two spacings), then one every 50 ms, so every
    // window is used in full and none holds more than 21.
    let spacing = 50 * MS;
    for (i, &at) in times.iter().enumerate() {
        let (window, j) = ((i / 21) as u32, (i % 21) as u32);
        let expected = match window {
            0 => Duration::ZERO,
            _ => WINDOW * window + spacing * j.saturating_sub(2),
        };
        assert_eq!(at - start, expected, "arrival {i}");
    }
    // Four full windows, and the fifth's turns that came within max_wait of a request sent before
    // the 4.5 s deadline: up to 4.2 s + 11 * 50 ms = 4.75 s.
    assert_eq!(times.len(), 4 * 21 + 14);
    assert_eq!(max_in_window(&times, WINDOW), 21);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_429_pauses_the_key_until_its_retry_after() {
    let sim = sim_with(Sim::builder().respond(
        "/3/limited",
        429,
        &[
            ("content-type", "application/json;charset=utf-8"),
            ("retry-after", "3"),
        ],
        r#"{"success":false,"status_code":25,"status_message":"Your request count (51) is over the allowed limit of (50)."}"#,
    ))
    .await;
    let harness = InProcess::new("[limit]\nmode = \"reject\"\n", sim);
    let start = Instant::now();

    let first = harness.get("/3/limited?api_key=PAUSED").await;
    assert_eq!(first.status, 429);
    assert_eq!(first.header("retry-after"), Some("3"), "TMDB's own kept");
    assert!(first.text().contains(r#""status_code":25"#));

    // While paused, the key is answered locally, with the time left until the pause ends.
    tokio::time::advance(ONE_SECOND).await;
    let during = harness.get("/3/movie/1?api_key=PAUSED").await;
    assert_code_25(&during, 50);
    assert_eq!(during.header("retry-after"), Some("2"));
    assert_eq!(during.header("ratelimit"), Some("\"per-key\";r=0;t=2"));
    // Another key is not paused.
    assert_eq!(harness.get("/3/movie/1?api_key=OTHER").await.status, 200);
    tokio::time::advance(2 * ONE_SECOND - Duration::from_nanos(1)).await;
    assert_eq!(harness.get("/3/movie/1?api_key=PAUSED").await.status, 429);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert_eq!(harness.get("/3/movie/2?api_key=PAUSED").await.status, 200);
    assert_eq!(
        harness.arrivals_of("PAUSED"),
        [start, start + 3 * ONE_SECOND]
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_whose_turn_falls_inside_a_pause_queues_again_behind_it() {
    let sim = sim_with(Sim::builder().latency(10 * MS).respond(
        "/3/limited",
        429,
        &[("content-type", "text/html"), ("retry-after", "2")],
        "<html>slow down</html>",
    ))
    .await;
    let harness = InProcess::new("[limit]\nrequests_per_second = 1\nmax_wait = \"5s\"\n", sim);
    let start = Instant::now();
    let limited = harness.spawn_get("/3/limited?api_key=K");
    // Queued behind it, for the next token at 1.05 s.
    let waiter = harness.spawn_get("/3/movie/2?api_key=K");
    // The upstream's 429 (not TMDB's body) comes back after 10 ms: code 25 written by the proxy,
    // and the key pauses for 2 s.
    let limited = limited.await.unwrap();
    assert_code_25(&limited, 1);
    assert_eq!(limited.header("retry-after"), Some("2"));
    assert_eq!(start.elapsed(), 10 * MS);
    assert_eq!(harness.proxy.queued(), 1);
    // The waiter's turn falls inside the pause: it queues again and leaves when the pause ends.
    assert_eq!(waiter.await.unwrap().status, 200);
    assert_eq!(
        harness.arrivals_of("K"),
        [start, start + 10 * MS + 2 * ONE_SECOND]
    );
}

#[tokio::test(start_paused = true)]
async fn a_small_pool_behind_a_slow_upstream_never_lets_a_burst_through() {
    // Requests wait for one of two connections for longer than the stamp tolerance, so their
    // tokens are re-stamped (or re-queued) when they finally leave.
    let sim = sim_with(Sim::builder().latency(150 * MS)).await;
    let harness = InProcess::new(
        "[upstream]\nmax_connections = 2\nrequest_timeout = \"1h\"\n\
         [limit]\nrequests_per_second = 8\nmax_wait = \"10s\"\n",
        sim,
    );
    let replies = burst_in_process(&harness, "/3/movie/1?api_key=SLOWPOOL", 30).await;
    assert_eq!(statuses(&replies), [200; 30]);
    let times = harness.arrivals_of("SLOWPOOL");
    assert_eq!(times.len(), 30);
    assert_eq!(max_in_window(&times, WINDOW), 8);
    assert!(harness.sim.max_open_connections() <= 2);
}

#[tokio::test(start_paused = true)]
async fn bearer_requests_are_limited_like_api_key_ones() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 3\nmode = \"reject\"\n",
        sim().await,
    );
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let reply = harness
            .get_with("/3/movie/1", &[("authorization", "Bearer opaque-token-1")])
            .await;
        statuses.push(reply.status.as_u16());
        if reply.status == 429 {
            assert_code_25(&reply, 3);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Another token has its own budget.
    let other = harness
        .get_with("/3/movie/1", &[("authorization", "Bearer opaque-token-2")])
        .await;
    assert_eq!(other.status, 200);
    assert_eq!(
        harness.sim.arrivals()[0].headers["authorization"],
        "Bearer opaque-token-1"
    );
}

#[tokio::test(start_paused = true)]
async fn a_read_token_shares_its_accounts_budget() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 2\nmode = \"reject\"\n",
        sim().await,
    );
    let bearer = format!("Bearer {}", jwt_with_aud("ACCOUNTKEY"));
    let v4 = [("authorization", bearer.as_str())];
    assert_eq!(
        harness.get("/3/movie/1?api_key=ACCOUNTKEY").await.status,
        200
    );
    assert_eq!(harness.get_with("/3/movie/2", &v4).await.status, 200);
    // Two spent between v3 and v4: the account's third request is refused either way.
    assert_eq!(
        harness.get("/3/movie/3?api_key=ACCOUNTKEY").await.status,
        429
    );
    assert_code_25(&harness.get_with("/4/list/1", &v4).await, 2);
    // A token for another account is unaffected.
    let other = format!("Bearer {}", jwt_with_aud("OTHERKEY"));
    assert_eq!(
        harness
            .get_with("/3/movie/4", &[("authorization", other.as_str())])
            .await
            .status,
        200
    );
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

fn header_u64(reply: &Reply, name: &str) -> u64 {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a whole number"))
}

#[tokio::test(start_paused = true)]
async fn rate_limit_headers_on_every_keyed_response_and_no_legacy_by_default() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 3\nmode = \"reject\"\n",
        sim().await,
    );
    let mut fields = Vec::new();
    for _ in 0..4 {
        let reply = harness.get("/3/movie/1?api_key=H").await;
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"per-key\";q=3;w=1")
        );
        fields.push(ratelimit_fields(&reply));
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
    // `t` is 0 while tokens remain, then the seconds until one is back, as in Retry-After.
    assert_eq!(fields, [(2, 0), (1, 0), (0, 2), (0, 2)]);
}

#[tokio::test(start_paused = true)]
async fn legacy_headers_when_enabled() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 2\nmode = \"reject\"\nlegacy_headers = true\n",
        sim().await,
    );
    // X-RateLimit-Reset is an epoch second: the wall clock, not the paused one.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    for expected_remaining in [1, 0, 0] {
        let before = now();
        let reply = harness.get("/3/movie/1?api_key=L").await;
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

#[tokio::test(start_paused = true)]
async fn idle_buckets_are_dropped_by_the_sweeper() {
    // A window of 1.01 s, swept every 100 ms: keys last seen at 0 are idle from 1.01 s and gone
    // at the 1.1 s sweep.
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 5\nsweep_interval = \"100ms\"\nwindow_margin = \"10ms\"\n",
        sim().await,
    );
    for i in 0..40 {
        let reply = harness.get(&format!("/3/movie/1?api_key=IDLE{i}")).await;
        assert_eq!(reply.status, 200);
    }
    let budget = harness.proxy.budget();
    assert_eq!(budget.tracked_keys(), 40);
    tokio::time::sleep(1099 * MS).await;
    assert_eq!(budget.tracked_keys(), 40);
    tokio::time::sleep(2 * MS).await;
    assert_eq!(budget.tracked_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn two_different_api_keys_in_one_query_are_refused() {
    let harness = InProcess::new("", sim().await);
    let reply = harness.get("/3/movie/1?api_key=A&api_key=B").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["status_code"], 47);
    assert_eq!(harness.sim.hits(), 0);
}

#[tokio::test(start_paused = true)]
async fn keyed_requests_refused_locally_still_carry_rate_limit_fields() {
    let harness = InProcess::new("[limit]\nrequests_per_second = 5\n", sim().await);
    assert_eq!(harness.get("/3/movie/1?api_key=F").await.status, 200);
    let refused = harness.get("/3/movie/1?api_key=F&page=0").await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"per-key\";q=5;w=1")
    );
    assert_eq!(ratelimit_fields(&refused), (4, 0));
    // A refusal spends nothing: four are still free.
    assert_eq!(
        ratelimit_fields(&harness.get("/3/movie/1?api_key=F").await),
        (3, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_waiting_its_turn_holds_no_other_key_back_at_the_global_ceiling() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 1\nglobal_requests_per_second = 10\nmax_wait = \"1500ms\"\n",
        sim().await,
    );
    let start = Instant::now();
    assert_eq!(harness.get("/3/movie/1?api_key=A").await.status, 200);
    let queued = harness.spawn_get("/3/movie/2?api_key=A");
    tokio::time::sleep(10 * MS).await;
    assert_eq!(harness.proxy.queued(), 1);
    // B's key has its token and the ceiling has nine: B goes at once.
    assert_eq!(harness.get("/3/movie/1?api_key=B").await.status, 200);
    assert_eq!(harness.arrivals_of("B"), [start + 10 * MS]);
    assert_eq!(queued.await.unwrap().status, 200);
    assert_eq!(harness.arrivals_of("A"), [start, start + WINDOW]);
}
