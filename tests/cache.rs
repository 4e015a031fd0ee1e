//! The response cache, in-process on paused time against the stand-in: hits, sharing between
//! keys, what never hits, coalescing, errors, stale answers, TTLs, the byte bound, purge.

mod support;

use std::time::Duration;

use support::*;
use tmdb_proxy::sim::{Route, Sim};

const ON: &str = "[cache]\nenabled = true\n";

fn hits_of(harness: &InProcess, path: &str) -> usize {
    harness
        .sim
        .arrivals()
        .iter()
        .filter(|a| a.path == path)
        .count()
}

fn cache_headers(reply: &Reply) -> (String, String) {
    let h = |n: &str| reply.header(n).unwrap_or("-").to_owned();
    (h("x-cache"), h("cache-status"))
}

#[tokio::test(start_paused = true)]
async fn a_repeat_is_answered_from_memory_byte_for_byte_with_its_age() {
    let harness = InProcess::new(ON, sim().await);
    let first = harness.get("/3/movie/550?api_key=A&language=en").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        cache_headers(&first),
        ("MISS".into(), "tmdb-proxy; fwd=miss; stored".into())
    );
    tokio::time::advance(Duration::from_secs(7)).await;
    // The same request, its pairs in another order.
    let second = harness.get("/3/movie/550?language=en&api_key=A").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body, "byte-identical");
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(
        second.header("cache-status"),
        Some("tmdb-proxy; hit; ttl=53")
    );
    assert_eq!(second.header("age"), Some("7"));
    assert!(
        second.header("ratelimit").is_some(),
        "a keyed answer still says the key's standing"
    );
    assert_eq!(hits_of(&harness, "/3/movie/550"), 1);
    let metrics = harness.proxy.render_metrics();
    for line in [
        "tmdb_proxy_cache_requests_total{result=\"hit\"} 1",
        "tmdb_proxy_cache_requests_total{result=\"miss\"} 1",
        "tmdb_proxy_cache_entries 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
}

#[tokio::test(start_paused = true)]
async fn different_known_keys_share_a_public_entry_and_unknown_keys_go_upstream() {
    let harness = InProcess::new(ON, sim().await);
    assert_eq!(harness.get("/3/movie/1?api_key=A").await.status, 200);
    // B is known once TMDB has answered it with success once.
    assert_eq!(harness.get("/3/movie/2?api_key=B").await.status, 200);
    let shared = harness.get("/3/movie/1?api_key=B").await;
    assert_eq!(shared.header("x-cache"), Some("HIT"));
    assert_eq!(hits_of(&harness, "/3/movie/1"), 1);
    // A key TMDB has never answered reads nothing from the cache: its request goes upstream.
    let stranger = harness.get("/3/movie/1?api_key=NEVER_SEEN").await;
    assert_eq!(stranger.header("x-cache"), Some("MISS"));
    assert_eq!(harness.arrivals_of("NEVER_SEEN").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn private_requests_never_hit() {
    let harness = InProcess::new(ON, sim().await);
    assert_eq!(harness.get("/3/movie/9?api_key=A").await.status, 200);
    for target in [
        "/3/movie/550?api_key=A&session_id=S",
        "/3/account/1?api_key=A",
        "/4/list/1?api_key=A",
        "/3/movie/550/account_states?api_key=A",
    ] {
        for round in 0..2 {
            let reply = harness.get(target).await;
            assert_eq!(
                reply.header("x-cache"),
                Some("BYPASS"),
                "{target} round {round}"
            );
            assert_eq!(reply.header("cache-status"), Some("tmdb-proxy; fwd=bypass"));
        }
    }
    let path = |p: &str| hits_of(&harness, p);
    assert_eq!(
        (
            path("/3/movie/550"),
            path("/3/account/1"),
            path("/4/list/1")
        ),
        (2, 2, 2)
    );
    let post = http::Request::post("/3/movie/550/rating?api_key=A")
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(harness.call(post).await.header("x-cache"), Some("BYPASS"));
}

#[tokio::test(start_paused = true)]
async fn a_hundred_identical_misses_make_one_upstream_request() {
    let harness = InProcess::new(
        ON,
        sim_with(Sim::builder().latency(Duration::from_millis(50))).await,
    );
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    let waiting: Vec<_> = (0..100)
        .map(|_| harness.spawn_get("/3/movie/77?api_key=A"))
        .collect();
    let mut collapsed = 0;
    let mut bodies = std::collections::HashSet::new();
    for reply in waiting {
        let reply = reply.await.unwrap();
        assert_eq!(reply.status, 200);
        bodies.insert(reply.body.clone());
        if reply.header("cache-status") == Some("tmdb-proxy; fwd=miss; collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(hits_of(&harness, "/3/movie/77"), 1);
    assert_eq!(bodies.len(), 1, "every waiter got the same full answer");
    assert_eq!(collapsed, 99);
}

#[tokio::test(start_paused = true)]
async fn a_failing_upstream_gives_every_waiter_the_same_tmdb_error_and_stores_nothing() {
    let sim = sim_with(Sim::builder().latency(Duration::from_millis(50)).route(
        "/3/movie/66",
        Route::with_headers(
            502,
            &[
                ("content-type", "text/html"),
                ("cache-control", "public, max-age=300"),
            ],
            "<html>edge</html>",
        ),
    ))
    .await;
    let harness = InProcess::new(ON, sim);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    let waiting: Vec<_> = (0..100)
        .map(|_| harness.spawn_get("/3/movie/66?api_key=A"))
        .collect();
    let mut answers = std::collections::HashSet::new();
    for reply in waiting {
        let reply = reply.await.unwrap();
        answers.insert((reply.status.as_u16(), reply.body.clone()));
    }
    assert_eq!(answers.len(), 1, "{answers:?}");
    let (status, body) = answers.into_iter().next().unwrap();
    assert_eq!(status, 502);
    assert!(
        std::str::from_utf8(&body)
            .unwrap()
            .contains(r#""status_code":"#)
    );
    assert_eq!(hits_of(&harness, "/3/movie/66"), 1);
    // Not stored: the next request goes upstream again.
    harness.get("/3/movie/66?api_key=A").await;
    assert_eq!(hits_of(&harness, "/3/movie/66"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_key_over_its_limit_gets_a_stale_copy_instead_of_429() {
    let toml = "[limit]\nrequests_per_second = 1\nmode = \"reject\"\n\
                [cache]\nmin_ttl = \"1s\"\nmax_ttl = \"1s\"\nstale_if_error = \"1h\"\n";
    let harness = InProcess::new(toml, sim().await);
    let fresh = harness.get("/3/movie/5?api_key=A").await;
    assert_eq!(fresh.header("x-cache"), Some("MISS"));
    tokio::time::advance(Duration::from_secs(2)).await;
    // The key spends its one token on another path, then asks for the expired entry.
    assert_eq!(harness.get("/3/movie/6?api_key=A").await.status, 200);
    let stale = harness.get("/3/movie/5?api_key=A").await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, fresh.body);
    assert_eq!(
        cache_headers(&stale),
        (
            "STALE".into(),
            "tmdb-proxy; fwd=stale; fwd-status=429".into()
        )
    );
    assert_eq!(stale.header("age"), Some("2"));
    assert_eq!(hits_of(&harness, "/3/movie/5"), 1);
}

/// A fill runs in a task of its own: what it met upstream still reaches the leader's metric and
/// status-page figures, as it does for a request the cache takes no part in.
#[tokio::test(start_paused = true)]
async fn an_upstream_429_met_by_a_fill_is_counted_for_the_request_that_led_it() {
    let sim = sim_with(Sim::builder().respond(
        "/3/movie/9",
        429,
        &[("content-type", "application/json"), ("retry-after", "2")],
        r#"{"success":false,"status_code":25,"status_message":"Your request count (51) is over the allowed limit of (50)."}"#,
    ))
    .await;
    let harness = InProcess::new(ON, sim);
    let reply = harness.get("/3/movie/9?api_key=A").await;
    assert_eq!(reply.status, 429);
    assert_eq!(hits_of(&harness, "/3/movie/9"), 1);
    let metrics = harness.proxy.render_metrics();
    for line in [
        "tmdb_proxy_upstream_429_total 1",
        "tmdb_proxy_upstream_pauses_total 1",
        r#"tmdb_proxy_requests_total{outcome="upstream_error",code="25"} 1"#,
        "tmdb_proxy_upstream_latency_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    let status = harness.proxy.status();
    assert_eq!(
        (
            status.all.requests,
            status.all.sent_total,
            status.all.upstream_429
        ),
        (1, 1, 1)
    );
    assert_eq!(status.upstream.pauses, 1);
}

#[tokio::test(start_paused = true)]
async fn freshness_has_a_floor_a_class_ceiling_and_an_end() {
    let sim = sim_with(
        Sim::builder()
            .route(
                "/3/search/movie",
                Route::with_headers(
                    200,
                    &[
                        ("content-type", "application/json"),
                        ("cache-control", "public, max-age=99999"),
                    ],
                    "{\"results\":[]}",
                ),
            )
            .route(
                "/3/movie/3",
                Route::with_headers(
                    200,
                    &[
                        ("content-type", "application/json"),
                        ("cache-control", "public, max-age=0"),
                    ],
                    "{\"id\":3}",
                ),
            ),
    )
    .await;
    let harness = InProcess::new(ON, sim);
    let status = |r: &Reply| r.header("x-cache").unwrap_or("-").to_owned();
    harness.get("/3/movie/3?api_key=A").await;
    harness.get("/3/search/movie?api_key=A&query=x").await;
    // max-age=0 on public data: kept for min_ttl (60 s).
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(status(&harness.get("/3/movie/3?api_key=A").await), "HIT");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(status(&harness.get("/3/movie/3?api_key=A").await), "MISS");
    // A search is kept 10 minutes at most, whatever TMDB says.
    tokio::time::advance(Duration::from_secs(9 * 60 - 61 + 58)).await;
    assert_eq!(
        status(&harness.get("/3/search/movie?query=x&api_key=A").await),
        "HIT"
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        status(&harness.get("/3/search/movie?query=x&api_key=A").await),
        "MISS"
    );
}

#[tokio::test(start_paused = true)]
async fn the_byte_bound_holds_after_filling_past_it() {
    let toml = "[cache]\nmax_size = \"64KiB\"\nmax_object_size = \"8KiB\"\n";
    let harness = InProcess::new(toml, sim().await);
    for id in 0..300 {
        assert_eq!(
            harness
                .get(&format!("/3/movie/{id}?api_key=A"))
                .await
                .status,
            200
        );
    }
    let (entries, bytes) = harness.proxy.cache_size().unwrap();
    assert!(bytes <= 64 * 1024, "{bytes} bytes in {entries} entries");
    assert!(entries > 10, "{entries} entries");
}

#[tokio::test(start_paused = true)]
async fn purge_empties_the_cache_or_a_prefix_of_it() {
    let harness = InProcess::new(ON, sim().await);
    for target in [
        "/3/movie/550",
        "/3/movie/550/credits",
        "/3/movie/551",
        "/3/tv/1",
    ] {
        harness.get(&format!("{target}?api_key=A")).await;
    }
    assert_eq!(harness.proxy.cache_size().unwrap().0, 4);
    assert_eq!(harness.proxy.purge_cache("/3/movie/550"), 2);
    assert_eq!(
        harness
            .get("/3/movie/550?api_key=A")
            .await
            .header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        harness
            .get("/3/movie/551?api_key=A")
            .await
            .header("x-cache"),
        Some("HIT")
    );
    assert_eq!(harness.proxy.purge_cache(""), 3);
    assert_eq!(harness.proxy.cache_size().unwrap().0, 0);
    // Over the admin listener: POST only, with the count removed.
    let purge = http::Request::post("/cache/purge?prefix=/3/tv")
        .body(())
        .unwrap();
    let answer = tmdb_proxy::admin::answer(&harness.proxy, &purge);
    assert_eq!(answer.status(), 200);
    let get = http::Request::get("/cache/purge").body(()).unwrap();
    assert_eq!(
        tmdb_proxy::admin::answer(&harness.proxy, &get).status(),
        405
    );
}

#[tokio::test(start_paused = true)]
async fn a_head_is_answered_from_the_get_entry() {
    let harness = InProcess::new(ON, sim().await);
    let get = harness.get("/3/movie/8?api_key=A").await;
    let head = http::Request::head("/3/movie/8?api_key=A")
        .body(http_body_util::Empty::new())
        .unwrap();
    let head = harness.call(head).await;
    assert_eq!(head.header("x-cache"), Some("HIT"));
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    assert_eq!(hits_of(&harness, "/3/movie/8"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_goes_away_leaves_the_fill_to_the_others() {
    let latency = Duration::from_millis(50);
    let harness = InProcess::new(ON, sim_with(Sim::builder().latency(latency)).await);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    let leader = harness.spawn_get("/3/movie/40?api_key=A");
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiters: Vec<_> = (0..5)
        .map(|_| harness.spawn_get("/3/movie/40?api_key=A"))
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    for waiter in waiters {
        let reply = waiter.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("cache-status"),
            Some("tmdb-proxy; fwd=miss; collapsed")
        );
    }
    assert_eq!(hits_of(&harness, "/3/movie/40"), 1);
    // And the answer was stored.
    assert_eq!(
        harness.get("/3/movie/40?api_key=A").await.header("x-cache"),
        Some("HIT")
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_that_breaks_is_never_stored() {
    let sim = sim_with(Sim::builder().fault(
        "/3/movie/13",
        tmdb_proxy::sim::Fault::BreakBody { length: 2000 },
    ))
    .await;
    let harness = InProcess::new(ON, sim);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    for round in 1..=2 {
        let reply = harness.get("/3/movie/13?api_key=A").await;
        assert_eq!(reply.status, 502, "round {round}");
        assert!(
            reply.text().contains(r#""status_code":43"#),
            "{}",
            reply.text()
        );
        assert_eq!(
            hits_of(&harness, "/3/movie/13"),
            round,
            "nothing was stored"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_answer_about_the_leaders_key_is_not_handed_to_the_waiters() {
    let sim = sim_with(
        Sim::builder()
            .latency(Duration::from_millis(50))
            .route("/3/movie/401", Route::json(401, r#"{"success":false,"status_code":7,"status_message":"Invalid API key: You must be granted a valid key."}"#)),
    )
    .await;
    let harness = InProcess::new(ON, sim);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    let waiting: Vec<_> = (0..5)
        .map(|_| harness.spawn_get("/3/movie/401?api_key=A"))
        .collect();
    for reply in waiting {
        let reply = reply.await.unwrap();
        assert_eq!(reply.status, 401);
        assert_ne!(
            reply.header("cache-status"),
            Some("tmdb-proxy; fwd=miss; collapsed")
        );
    }
    // Each asked on its own: a 401 says something about a key, not about the data.
    assert_eq!(hits_of(&harness, "/3/movie/401"), 5);
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_the_entries_unless_the_cache_settings_changed() {
    let harness = InProcess::new(ON, sim().await);
    harness.get("/3/movie/21?api_key=A").await;
    let same = config(
        &format!("{ON}[limit]\nrequests_per_second = 40\n"),
        &harness.sim.url(),
    );
    harness.proxy.reload(&same).unwrap();
    assert_eq!(
        harness.get("/3/movie/21?api_key=A").await.header("x-cache"),
        Some("HIT")
    );
    let changed = config("[cache]\nmin_ttl = \"2m\"\n", &harness.sim.url());
    harness.proxy.reload(&changed).unwrap();
    assert_eq!(
        harness.get("/3/movie/21?api_key=A").await.header("x-cache"),
        Some("MISS")
    );
}

#[tokio::test(start_paused = true)]
async fn an_answer_without_a_length_is_stored_if_small_and_passed_on_whole_if_not() {
    let sim = sim_with(
        Sim::builder()
            .stream("/3/movie/300", 64 * 1024, 5, None)
            .stream("/3/movie/900", 64 * 1024, 3, None),
    )
    .await;
    let harness = InProcess::new("[cache]\nmax_object_size = \"128KiB\"\n", sim);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    // 320 KiB, chunked: more than max_object_size, so served whole and not stored.
    for round in 1..=2 {
        let reply = harness.get("/3/movie/300?api_key=A").await;
        assert_eq!(reply.body.len(), 5 * 64 * 1024, "round {round}");
        assert_eq!(reply.header("x-cache"), Some("MISS"));
    }
    assert_eq!(hits_of(&harness, "/3/movie/300"), 2);
    // With a 1 MiB limit, a 192 KiB chunked answer is stored and answers the repeat.
    let harness = InProcess::new("[cache]\nmax_object_size = \"1MiB\"\n", harness.sim);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    let first = harness.get("/3/movie/900?api_key=A").await;
    let second = harness.get("/3/movie/900?api_key=A").await;
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(second.body, first.body);
    assert_eq!(second.body.len(), 3 * 64 * 1024);
}

#[tokio::test(start_paused = true)]
async fn a_large_fill_streams_to_its_first_client_while_it_is_stored() {
    use http_body_util::BodyExt;
    // 900 KiB in three chunks; the last two only once the gate opens.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let sim =
        sim_with(Sim::builder().stream("/3/movie/800", 300 * 1024, 3, Some(gate.clone()))).await;
    let harness = InProcess::new(ON, sim);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);

    let req = http::Request::get("/3/movie/800?api_key=A")
        .body(http_body_util::Empty::new())
        .unwrap();
    let client = IN_PROCESS_CLIENT.parse().unwrap();
    let response = harness.proxy.handle(req, client).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("x-cache").map(|v| v.as_bytes()),
        Some(&b"MISS"[..])
    );
    let mut body = response.into_body();
    let mut first = 0;
    while first < 300 * 1024 {
        let frame = body.frame().await.expect("a frame").expect("no error");
        first += frame.data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(
        first,
        300 * 1024,
        "the first chunk, before the rest was sent"
    );

    // A second client joins the flight: it gets the answer whole, once it is whole.
    let waiter = harness.spawn_get("/3/movie/800?api_key=A");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "the body is not whole yet");
    gate.notify_one();
    let rest = body.collect().await.expect("the rest arrives").to_bytes();
    assert_eq!(first + rest.len(), 900 * 1024);
    let waited = waiter.await.unwrap();
    assert_eq!(waited.body.len(), 900 * 1024);
    assert_eq!(
        cache_headers(&waited),
        ("MISS".into(), "tmdb-proxy; fwd=miss; collapsed".into())
    );

    let hit = harness.get("/3/movie/800?api_key=A").await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.body, waited.body);
    assert_eq!(hits_of(&harness, "/3/movie/800"), 1);
}

#[tokio::test(start_paused = true)]
async fn an_uncompressed_answer_is_stored_compressed_and_served_as_each_client_takes_it() {
    use std::io::Read;
    let movies: Vec<String> = (0..400)
        .map(|i| format!("{{\"id\":{i},\"title\":\"Movie number {i}\",\"adult\":false}}"))
        .collect();
    let json = format!("{{\"page\":1,\"results\":[{}]}}", movies.join(","));
    let sim = sim_with(Sim::builder().route(
        "/3/movie/popular",
        Route::with_headers(
            200,
            &[
                ("content-type", "application/json;charset=utf-8"),
                ("cache-control", "public, max-age=3600"),
                ("etag", "\"v1\""),
            ],
            json.clone(),
        ),
    ))
    .await;
    let harness = InProcess::new(ON, sim);
    let first = harness.get("/3/movie/popular?api_key=A").await;
    assert_eq!(first.body, json.as_bytes());
    assert_eq!(first.header("content-encoding"), None);

    let bytes: u64 = harness
        .proxy
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix("tmdb_proxy_cache_size_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("cache_size_bytes");
    assert!(
        bytes < json.len() as u64 / 4,
        "{bytes} bytes held for a {} byte answer",
        json.len()
    );

    let plain = harness.get("/3/movie/popular?api_key=A").await;
    assert_eq!(plain.header("x-cache"), Some("HIT"));
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(
        plain.body,
        json.as_bytes(),
        "decompressed for a client without gzip"
    );

    let gz = harness
        .get_with(
            "/3/movie/popular?api_key=A",
            &[("accept-encoding", "gzip, deflate")],
        )
        .await;
    assert_eq!(gz.header("x-cache"), Some("HIT"));
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("vary"), Some("Accept-Encoding"));
    assert_eq!(
        gz.header("etag"),
        Some("W/\"v1\""),
        "it named the plain bytes"
    );
    assert_eq!(
        gz.header("content-length"),
        Some(gz.body.len().to_string().as_str())
    );
    let mut decoded = String::new();
    flate2::read::GzDecoder::new(&gz.body[..])
        .read_to_string(&mut decoded)
        .unwrap();
    assert_eq!(decoded, json);
    assert_eq!(hits_of(&harness, "/3/movie/popular"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_first_client_that_goes_away_leaves_the_fill_to_the_others() {
    use http_body_util::BodyExt;
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let sim =
        sim_with(Sim::builder().stream("/3/movie/801", 300 * 1024, 3, Some(gate.clone()))).await;
    let harness = InProcess::new(ON, sim);
    assert_eq!(harness.get("/3/movie/2?api_key=A").await.status, 200);
    let req = http::Request::get("/3/movie/801?api_key=A")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = harness
        .proxy
        .handle(req, IN_PROCESS_CLIENT.parse().unwrap())
        .await;
    let mut body = response.into_body();
    body.frame().await.expect("a frame").expect("no error");
    let waiter = harness.spawn_get("/3/movie/801?api_key=A");
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(body);
    gate.notify_one();
    let waited = waiter.await.unwrap();
    assert_eq!(waited.body.len(), 900 * 1024);
    let hit = harness.get("/3/movie/801?api_key=A").await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hits_of(&harness, "/3/movie/801"), 1);
}
