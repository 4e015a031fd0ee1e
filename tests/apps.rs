//! Apps sharing one key (`[clients]`), in-process on paused time against the stand-in: tokens and
//! the key they are sent with, 401 code 3, priorities, fair shares, caps.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use support::*;
use tmdb_proxy::Proxy;
use tmdb_proxy::sim::{Sim, max_in_window};
use tokio::time::Instant;

const ONE_SECOND: Duration = Duration::from_secs(1);

/// Two apps on one key `APPKEY` (limit 50/s, queue mode): `web` interactive by its token,
/// `scraper` batch by its token's digest (`{SCRAPER_SHA}`, filled in).
const WEB_AND_SCRAPER: &str = "[keys.aliases]\nshared = \"APPKEY\"\n\
    [[clients.apps]]\nname = \"web\"\ntoken = \"web-token\"\nalias = \"shared\"\n\
    [[clients.apps]]\nname = \"scraper\"\ntoken_sha256 = \"{SCRAPER_SHA}\"\napi_key = \"APPKEY\"\npriority = \"batch\"\n";

fn web_and_scraper() -> String {
    WEB_AND_SCRAPER.replace("{SCRAPER_SHA}", &hex_sha256("scraper-token"))
}

fn hex_sha256(token: &str) -> String {
    tmdb_proxy::config::sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn get_as(path: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut req = Request::get(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Empty::new()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_known_token_is_sent_with_its_apps_key_and_without_the_token() {
    let harness = InProcess::new(&web_and_scraper(), sim().await);
    // The client's own key and Authorization are replaced by the app's key.
    let reply = harness
        .call(get_as(
            "/3/movie/550?api_key=CLIENTKEY&language=en",
            &[
                ("x-proxy-token", "web-token"),
                ("authorization", "Bearer CLIENTTOKEN"),
            ],
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = harness
        .call(get_as(
            "/3/movie/551",
            &[("proxy-authorization", "Bearer scraper-token")],
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let arrivals = harness.sim.arrivals();
    assert_eq!(arrivals.len(), 2);
    for arrival in &arrivals {
        assert_eq!(arrival.credential.as_deref(), Some("APPKEY"));
        for header in ["x-proxy-token", "proxy-authorization", "authorization"] {
            assert!(arrival.headers.get(header).is_none(), "{header} forwarded");
        }
    }
    assert_eq!(
        arrivals[0].query.as_deref(),
        Some("language=en&api_key=APPKEY")
    );
    let metrics = harness.proxy.render_metrics();
    for line in [
        "tmdb_proxy_app_requests_total{app=\"web\",outcome=\"forwarded\"} 1",
        "tmdb_proxy_app_requests_total{app=\"scraper\",outcome=\"forwarded\"} 1",
        "tmdb_proxy_app_queue_wait_seconds_count{app=\"web\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_app_with_a_v4_token_is_sent_with_it_as_a_bearer() {
    let jwt = jwt_with_aud("V4KEY");
    let toml = format!("[[clients.apps]]\nname = \"v4\"\ntoken = \"t\"\napi_key = \"{jwt}\"\n");
    let harness = InProcess::new(&toml, sim().await);
    let reply = harness
        .call(get_as("/3/movie/1?api_key=MINE", &[("x-proxy-token", "t")]))
        .await;
    assert_eq!(reply.status, 200);
    let arrival = &harness.sim.arrivals()[0];
    assert_eq!(arrival.query, None, "no api_key beside the token");
    assert_eq!(
        arrival
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {jwt}").as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn an_unknown_or_missing_token_gets_401_code_3_when_required() {
    let harness = InProcess::new(&web_and_scraper(), sim().await);
    let unknown = harness
        .call(get_as(
            "/3/movie/1?api_key=K",
            &[("x-proxy-token", "guess")],
        ))
        .await;
    assert_eq!(unknown.status, 401);
    assert_eq!(
        unknown.text(),
        r#"{"success":false,"status_code":3,"status_message":"Authentication failed: You do not have permissions to access the service."}"#
    );
    // Without a token, and not required: handled as without apps.
    let own = harness.call(get_as("/3/movie/2?api_key=K", &[])).await;
    assert_eq!(own.status, 200);

    let required = format!("[clients]\nrequire_token = true\n{}", web_and_scraper());
    let harness = InProcess::new(&required, harness.sim);
    for headers in [
        &[][..],
        &[("x-proxy-token", "guess")],
        &[("proxy-authorization", "Basic d2ViOnRva2Vu")],
    ] {
        let reply = harness.call(get_as("/3/movie/3?api_key=K", headers)).await;
        assert_eq!(reply.status, 401, "{headers:?}");
        assert_eq!(reply.json()["status_code"], 3);
    }
    assert_eq!(
        harness.sim.arrivals().len(),
        1,
        "refused tokens never reach the upstream"
    );
    let reply = harness
        .call(get_as("/3/movie/4", &[("x-proxy-token", "web-token")]))
        .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(start_paused = true)]
async fn a_reload_rotates_a_token_with_both_valid_in_between() {
    let old = hex_sha256("old-token");
    let new = hex_sha256("new-token");
    let app = |digests: &str| {
        format!("[[clients.apps]]\nname = \"web\"\ntoken_sha256 = {digests}\napi_key = \"K\"\n")
    };
    let harness = InProcess::new(&app(&format!("\"{old}\"")), sim().await);
    let status = |token: &'static str| {
        let proxy = harness.proxy.clone();
        async move {
            call(&proxy, get_as("/3/movie/1", &[("x-proxy-token", token)]))
                .await
                .status
                .as_u16()
        }
    };
    assert_eq!(
        (status("old-token").await, status("new-token").await),
        (200, 401)
    );
    let both = config(&app(&format!("[\"{old}\", \"{new}\"]")), &harness.sim.url());
    harness.proxy.reload(&both).unwrap();
    assert_eq!(
        (status("old-token").await, status("new-token").await),
        (200, 200)
    );
    let only_new = config(&app(&format!("\"{new}\"")), &harness.sim.url());
    harness.proxy.reload(&only_new).unwrap();
    assert_eq!(
        (status("old-token").await, status("new-token").await),
        (401, 200)
    );
}

/// Sends `per_second` requests a second of `token` for `for_`, each in a task of its own; the
/// statuses and the time each took, in order.
fn push(
    proxy: &Proxy,
    token: &'static str,
    per_second: u32,
    for_: Duration,
) -> tokio::task::JoinHandle<Vec<(u16, Duration)>> {
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let every = ONE_SECOND / per_second;
        let end = Instant::now() + for_;
        let mut tasks = Vec::new();
        let mut n = 0u64;
        while Instant::now() < end {
            let proxy = proxy.clone();
            n += 1;
            let path = format!("/3/movie/{n}?app={token}");
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let reply = call(&proxy, get_as(&path, &[("x-proxy-token", token)])).await;
                (reply.status.as_u16(), sent.elapsed())
            }));
            tokio::time::sleep(every).await;
        }
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    })
}

/// Arrivals at the stand-in of each app (by the `app` query pair the test adds), in order.
fn arrivals_by_app(sim: &Sim, token: &str) -> Vec<Instant> {
    let tag = format!("app={token}");
    sim.arrivals()
        .iter()
        .filter(|a| a.query.as_deref().is_some_and(|q| q.contains(&tag)))
        .map(|a| a.at)
        .collect()
}

/// How many of `times` lie from `from` to `to` seconds after `start`.
fn count_between(times: &[Instant], start: Instant, from: u64, to: u64) -> usize {
    times
        .iter()
        .filter(|at| {
            let since = at.duration_since(start);
            since >= Duration::from_secs(from) && since < Duration::from_secs(to)
        })
        .count()
}

#[tokio::test(start_paused = true)]
async fn an_interactive_app_goes_first_while_a_batch_app_takes_the_rest() {
    let harness = InProcess::new(&web_and_scraper(), sim().await);
    let scraper = push(
        &harness.proxy,
        "scraper-token",
        300,
        Duration::from_secs(10),
    );
    // The scraper saturates the key first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let web = push(&harness.proxy, "web-token", 10, Duration::from_secs(6));
    let web = web.await.unwrap();
    let scraper = scraper.await.unwrap();

    // 1.05 s / 50: the key's pacing interval once dry.
    let interval = Duration::from_millis(21);
    assert_eq!(web.len(), 60);
    assert!(web.iter().all(|(status, _)| *status == 200), "{web:?}");
    // Each interactive request gets the key's next token: within one pacing interval, or
    // within the longest gap between two of the key's tokens (the budget's pacing allows a small
    // burst, so its stream has a gap of three intervals, then a short burst, once a window).
    let all: Vec<Instant> = harness.sim.arrivals().iter().map(|a| a.at).collect();
    assert!(max_in_window(&all, ONE_SECOND) <= 50, "a window over 50");
    // While the web app ran (the first arrivals are the opening burst).
    let steady: Vec<Instant> = all
        .iter()
        .copied()
        .filter(|at| at.duration_since(all[0]) >= Duration::from_secs(2))
        .filter(|at| at.duration_since(all[0]) < Duration::from_secs(8))
        .collect();
    let longest_gap = steady.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(longest_gap <= 3 * interval, "{longest_gap:?}");
    let waits: Vec<Duration> = web.iter().map(|(_, took)| *took).collect();
    assert!(waits.iter().all(|w| *w <= longest_gap), "{waits:?}");
    let within_one = waits.iter().filter(|w| **w <= interval).count();
    assert!(within_one * 100 >= waits.len() * 90, "{waits:?}");
    // The scraper had the rest: over the 6 s the web app ran, 50 per 1.05 s less the web's 60.
    let scraped = arrivals_by_app(&harness.sim, "scraper-token");
    let during = scraped
        .iter()
        .filter(|at| {
            let since = at.duration_since(scraped[0]);
            since >= Duration::from_secs(2) && since < Duration::from_secs(8)
        })
        .count();
    let expected = 6 * 50 * 100 / 105 - 60;
    assert!(
        during * 100 >= expected * 95,
        "the scraper got {during} of about {expected} left to it"
    );
    let refused = scraper.iter().filter(|(status, _)| *status == 429).count();
    assert!(refused > 0, "the scraper asked for more than the key has");
}

/// Apps `big` (share 3) and `small` (share 1) on one key, after `limit` (a `[limit]` section or
/// nothing), each pushing 200 requests a second (`small` for `small_for`, `big` for `big_for`);
/// the harness, each app's arrivals at the stand-in, and the first arrival.
async fn three_to_one(
    limit: &str,
    big_for: Duration,
    small_for: Duration,
) -> (InProcess, Vec<Instant>, Vec<Instant>, Instant) {
    let toml = format!(
        "{limit}[[clients.apps]]\nname = \"big\"\ntoken = \"big\"\napi_key = \"K\"\nshare = 3\n\
         [[clients.apps]]\nname = \"small\"\ntoken = \"small\"\napi_key = \"K\"\nshare = 1\n"
    );
    let harness = InProcess::new(&toml, sim().await);
    let big = push(&harness.proxy, "big", 200, big_for);
    let small = push(&harness.proxy, "small", 200, small_for);
    small.await.unwrap();
    big.await.unwrap();
    let big = arrivals_by_app(&harness.sim, "big");
    let small = arrivals_by_app(&harness.sim, "small");
    let start = big[0].min(small[0]);
    (harness, big, small, start)
}

#[tokio::test(start_paused = true)]
async fn two_apps_with_shares_3_to_1_split_the_key_and_one_alone_gets_all_of_it() {
    let (harness, big, small, start) =
        three_to_one("", Duration::from_secs(14), Duration::from_secs(8)).await;
    let between = |times: &[Instant], from: u64, to: u64| count_between(times, start, from, to);
    // Both pushing, from 2 s to 8 s.
    let (b, s) = (between(&big, 2, 8), between(&small, 2, 8));
    let big_share = b as f64 / (b + s) as f64;
    assert!(
        (0.70..=0.80).contains(&big_share),
        "big got {b}, small {s}: {big_share:.3}"
    );
    // Once the small app stopped (at 8 s; its last queued requests are served by 10 s), the
    // big one has all of the key: 50 per 1.05 s.
    assert_eq!(between(&small, 10, 14), 0);
    let alone = between(&big, 10, 14);
    let ceiling = 4 * 50 * 100 / 105;
    assert!(alone * 100 >= ceiling * 95, "alone: {alone} of {ceiling}");
    let all: Vec<Instant> = harness.sim.arrivals().iter().map(|a| a.at).collect();
    assert!(max_in_window(&all, ONE_SECOND) <= 50);
}

#[tokio::test(start_paused = true)]
async fn in_reject_mode_shares_hold_by_refusing_the_app_over_its_share() {
    let eight = Duration::from_secs(8);
    let (harness, big, small, start) =
        three_to_one("[limit]\nmode = \"reject\"\n", eight, eight).await;
    let after = |times: &[Instant]| count_between(times, start, 2, u64::MAX);
    let (b, s) = (after(&big), after(&small));
    let big_share = b as f64 / (b + s) as f64;
    assert!(
        (0.70..=0.80).contains(&big_share),
        "big got {b}, small {s}: {big_share:.3}"
    );
    let all: Vec<Instant> = harness.sim.arrivals().iter().map(|a| a.at).collect();
    assert!(max_in_window(&all, ONE_SECOND) <= 50);
}

#[tokio::test(start_paused = true)]
async fn an_apps_own_cap_holds_under_its_share() {
    let toml = "[[clients.apps]]\nname = \"capped\"\ntoken = \"c\"\napi_key = \"K\"\nrequests_per_second = 10\n";
    let harness = InProcess::new(toml, sim().await);
    let replies = push(&harness.proxy, "c", 100, Duration::from_secs(5))
        .await
        .unwrap();
    let arrivals = arrivals_by_app(&harness.sim, "c");
    assert!(max_in_window(&arrivals, ONE_SECOND) <= 10);
    // 10 per 1.05 s.
    assert!(arrivals.len() >= 45, "{} arrivals", arrivals.len());
    assert!(replies.iter().any(|(status, _)| *status == 429));
}

#[tokio::test(start_paused = true)]
async fn a_cache_hit_spends_nothing_from_an_apps_share() {
    let toml = "[cache]\nenabled = true\n\
        [[clients.apps]]\nname = \"capped\"\ntoken = \"c\"\napi_key = \"K\"\nrequests_per_second = 2\n";
    let harness = InProcess::new(toml, sim().await);
    let token = [("x-proxy-token", "c")];
    // Known to TMDB, then the entry is filled: the app's two tokens of this window.
    assert_eq!(harness.call(get_as("/3/movie/1", &token)).await.status, 200);
    assert_eq!(
        harness.call(get_as("/3/movie/550", &token)).await.status,
        200
    );
    // Its cap is spent, yet every repeat is a hit.
    for _ in 0..10 {
        let reply = harness.call(get_as("/3/movie/550", &token)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-cache"), Some("HIT"));
    }
    // A miss now waits for the cap (queue mode) rather than passing it.
    let sent = Instant::now();
    assert_eq!(harness.call(get_as("/3/movie/2", &token)).await.status, 200);
    assert!(
        sent.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(harness.sim.arrivals().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_that_goes_away_leaves_its_turn_to_the_next() {
    let toml = "[limit]\nrequests_per_second = 1\n\
        [[clients.apps]]\nname = \"a\"\ntoken = \"a\"\napi_key = \"K\"\n\
        [[clients.apps]]\nname = \"b\"\ntoken = \"b\"\napi_key = \"K\"\n";
    let harness = InProcess::new(toml, sim().await);
    let start = Instant::now();
    let send = |token: &'static str, path: &'static str| {
        let proxy = harness.proxy.clone();
        tokio::spawn(async move {
            let reply = call(&proxy, get_as(path, &[("x-proxy-token", token)])).await;
            (reply.status.as_u16(), start.elapsed())
        })
    };
    let first = send("a", "/3/movie/1");
    tokio::time::sleep(Duration::from_millis(10)).await;
    let gone = send("a", "/3/movie/2");
    tokio::time::sleep(Duration::from_millis(10)).await;
    let next = send("b", "/3/movie/3");
    tokio::time::sleep(Duration::from_millis(500)).await;
    gone.abort();
    assert_eq!(first.await.unwrap().0, 200);
    let (status, at) = next.await.unwrap();
    assert_eq!(status, 200);
    // The key's next token, one window (1.05 s) after the first: not a window later still.
    assert_eq!(at, Duration::from_millis(1050), "{at:?}");
    assert_eq!(harness.arrived_paths(), ["/3/movie/1", "/3/movie/3"]);
}
