//! Operating the proxy: admin endpoints, metrics, request ids, per-key overrides, the global
//! ceiling, and reload, in process over real sockets.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use http::StatusCode;
use support::*;
use tmdb_proxy::Config;
use tmdb_proxy::server::reload;
use tmdb_proxy::sim::{Sim, max_in_window};
use tokio::net::TcpListener;

/// Starts the admin listener for `proxy` on 127.0.0.1:0; returns its base URL.
async fn admin(proxy: &Running) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (proxy, cfg) = (
        proxy.proxy.clone(),
        Config::from_toml_str("").unwrap().server,
    );
    tokio::spawn(async move {
        tmdb_proxy::admin::run(listener, proxy, &cfg, std::future::pending()).await;
    });
    url
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let sim = sim_with(Sim::builder().respond(
        "/3/broken",
        502,
        &[("content-type", "text/html")],
        "<html>bad gateway</html>",
    ))
    .await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 2\nmode = \"reject\"\n[keys.aliases]\nweb = \"WEBKEY\"\n",
        &sim.url(),
    )
    .await;
    let admin = admin(&proxy).await;
    let client = http1_client();

    let health = get(&client, &format!("{admin}/healthz")).await;
    assert_eq!((health.status, health.text()), (StatusCode::OK, "ok\n"));
    assert_eq!(get(&client, &format!("{admin}/readyz")).await.status, 200);
    assert_eq!(get(&client, &format!("{admin}/nope")).await.status, 404);

    let before = get(&client, &format!("{admin}/metrics")).await;
    assert_eq!(
        before.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let forwarded = r#"tmdb_proxy_requests_total{outcome="forwarded",code=""}"#;
    assert_eq!(metric(before.text(), forwarded), 0.0);

    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=WEBKEY"))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=WEBKEY"))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=WEBKEY"))
            .await
            .status,
        429
    );
    assert_eq!(get(&client, &proxy.url("/3/movie/1")).await.status, 401);
    assert_eq!(
        get(&client, &proxy.url("/3/broken?api_key=OTHER"))
            .await
            .status,
        502
    );

    let after = get(&client, &format!("{admin}/metrics")).await;
    let text = after.text();
    assert_eq!(metric(text, forwarded), 2.0, "{text}");
    assert_eq!(
        metric(
            text,
            r#"tmdb_proxy_requests_total{outcome="limited",code="25"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            text,
            r#"tmdb_proxy_requests_total{outcome="rejected_invalid",code="7"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            text,
            r#"tmdb_proxy_requests_total{outcome="upstream_error",code="43"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            text,
            r#"tmdb_proxy_key_requests_total{alias="web",outcome="forwarded"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            text,
            r#"tmdb_proxy_key_requests_total{alias="web",outcome="limited"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(text, "tmdb_proxy_upstream_latency_seconds_count"),
        3.0
    );
    assert!(metric(text, "tmdb_proxy_active_buckets") >= 2.0);
    assert!(metric(text, "tmdb_proxy_client_connections") >= 1.0);
    // Keys never appear, only aliases.
    assert!(!text.contains("WEBKEY") && !text.contains("OTHER"));

    proxy.proxy.begin_drain(
        tokio::time::Instant::now() + Duration::from_secs(5),
        tokio::time::Instant::now() + Duration::from_secs(9),
    );
    let draining = get(&client, &format!("{admin}/readyz")).await;
    assert_eq!(draining.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&client, &format!("{admin}/healthz")).await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn upstream_429s_and_queue_are_counted() {
    let sim = sim_with(Sim::builder().json(
        "/3/limited",
        429,
        r#"{"status_code":25,"status_message":"x"}"#,
    ))
    .await;
    let harness = InProcess::new("[limit]\nrequests_per_second = 1\nmax_wait = \"5s\"\n", sim);
    assert_eq!(harness.get("/3/limited?api_key=U").await.status, 429);
    // A request queued behind the pause (1 s: the upstream sent no Retry-After) shows in the
    // queue gauge.
    let waiter = harness.spawn_get("/3/movie/1?api_key=U");
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(harness.proxy.queued(), 1);
    let text = harness.proxy.render_metrics();
    assert_eq!(
        metric(&text, "tmdb_proxy_upstream_429_total"),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "tmdb_proxy_queue_waiting"), 1.0);
    assert_eq!(
        metric(
            &text,
            r#"tmdb_proxy_requests_total{outcome="upstream_error",code="25"}"#
        ),
        1.0
    );
    assert_eq!(waiter.await.unwrap().status, 200);
    assert_eq!(
        metric(&harness.proxy.render_metrics(), "tmdb_proxy_queue_waiting"),
        0.0
    );
}

#[tokio::test]
async fn request_ids_are_kept_or_generated_and_echoed() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let client = http1_client();
    let kept = get_with(
        &client,
        &proxy.url("/3/movie/1?api_key=R"),
        &[("x-request-id", "abc-123")],
    )
    .await;
    assert_eq!(kept.header("x-request-id"), Some("abc-123"));
    let generated = get(&client, &proxy.url("/3/movie/1")).await;
    let id = generated.header("x-request-id").expect("generated id");
    assert_eq!(id.len(), 16);
    let unsafe_id = get_with(
        &client,
        &proxy.url("/3/movie/1?api_key=R"),
        &[("x-request-id", "a b\"c")],
    )
    .await;
    assert_ne!(unsafe_id.header("x-request-id"), Some("a b\"c"));
}

/// Arrival times at the stand-in for one credential.
fn times_of(sim: &tmdb_proxy::sim::Sim, credential: &str) -> Vec<tokio::time::Instant> {
    sim.arrivals()
        .iter()
        .filter(|a| a.credential.as_deref() == Some(credential))
        .map(|a| a.at)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_overrides_and_the_global_ceiling_hold_at_the_upstream() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[keys.aliases]\nslow = \"SLOWKEY\"\n\
         [limit]\nrequests_per_second = 10\nglobal_requests_per_second = 15\nmode = \"reject\"\n\
         [[limit.overrides]]\nalias = \"slow\"\nrequests_per_second = 3\n\
         [[limit.overrides]]\nkey = \"FASTKEY\"\nrequests_per_second = 40\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let mut tasks = Vec::new();
    for key in ["SLOWKEY", "FASTKEY", "PLAIN"] {
        for _ in 0..30 {
            let (client, url) = (
                client.clone(),
                proxy.url(&format!("/3/movie/1?api_key={key}")),
            );
            tasks.push(tokio::spawn(async move { get(&client, &url).await.status }));
        }
    }
    for task in tasks {
        let status = task.await.unwrap();
        assert!(status == 200 || status == 429);
    }
    let one_second = Duration::from_secs(1);
    assert!(max_in_window(&times_of(&sim, "SLOWKEY"), one_second) <= 3);
    assert!(max_in_window(&times_of(&sim, "PLAIN"), one_second) <= 10);
    let all: Vec<_> = sim.arrivals().iter().map(|a| a.at).collect();
    assert!(max_in_window(&all, one_second) <= 15, "global ceiling");
    assert_eq!(all.len(), 15, "the global budget was used in full");
}

#[tokio::test]
async fn reload_applies_a_lower_limit_on_an_open_keep_alive_connection() {
    let sim = sim().await;
    let base = "[limit]\nmode = \"reject\"\nrequests_per_second = ";
    let mut env = HashMap::new();
    env.insert("TMDB_PROXY__UPSTREAM__BASE_URL".to_owned(), sim.url());
    env.insert("TMDB_PROXY__CACHE__ENABLED".to_owned(), "false".to_owned());
    let proxy = spawn_proxy(&format!("{base}5\n"), &sim.url()).await;

    // One HTTP/1.1 connection for the whole test.
    let mut conn = OneConnection::open(proxy.addr).await;
    assert_eq!(conn.status_for_key("BEFORE").await, 200);
    assert_eq!(conn.status_for_key("BEFORE").await, 200);

    let lower = Config::from_toml_with_env(&format!("{base}1\n"), Some(env.clone())).unwrap();
    proxy.proxy.reload(&lower).unwrap();
    assert_eq!(conn.status_for_key("AFTER").await, 200);
    assert_eq!(
        conn.status_for_key("AFTER").await,
        429,
        "the new limit of 1 applies"
    );
    // The key with history keeps its bucket: two already spent, over the new limit.
    assert_eq!(conn.status_for_key("BEFORE").await, 429);
}

#[tokio::test(start_paused = true)]
async fn a_reload_with_broken_tls_files_is_refused_whole() {
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 5\nmode = \"reject\"\n",
        sim().await,
    );
    let dir = std::env::temp_dir().join(format!("tmdb-proxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (junk, file) = (dir.join("junk.pem"), dir.join("tmdb-proxy.toml"));
    std::fs::write(&junk, "not PEM\n").unwrap();
    let lower = format!(
        "[upstream]\nbase_url = \"{}\"\n[limit]\nrequests_per_second = 1\nmode = \"reject\"\n\
         [cache]\nenabled = false\n",
        harness.sim.url()
    );
    let tls = format!(
        "[server.tls]\ncert_file = \"{0}\"\nkey_file = \"{0}\"\n",
        junk.display()
    );
    std::fs::write(&file, format!("{lower}{tls}")).unwrap();
    let running = config("", &harness.sim.url());
    let refused = reload::reload(&file, &harness.proxy, &running, "test");
    assert!(
        matches!(refused, Err(reload::ReloadError::Tls(_))),
        "{refused:?}"
    );
    // Nothing of the file took effect: the limit is still 5.
    for _ in 0..5 {
        assert_eq!(harness.get("/3/movie/1?api_key=KEEP").await.status, 200);
    }
    assert_code_25(&harness.get("/3/movie/1?api_key=KEEP").await, 5);
    // The same file without the broken section applies.
    std::fs::write(&file, lower).unwrap();
    reload::reload(&file, &harness.proxy, &running, "test").unwrap();
    assert_eq!(harness.get("/3/movie/1?api_key=NEW").await.status, 200);
    assert_code_25(&harness.get("/3/movie/1?api_key=NEW").await, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_timed_out_and_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let cfg = Config::from_toml_str(
        "[server]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"300ms\"\n",
    )
    .unwrap()
    .server;
    let served = proxy.proxy.clone();
    tokio::spawn(async move {
        tmdb_proxy::admin::run(listener, served, &cfg, std::future::pending()).await;
    });
    // More idle connections than the admin cap (64), and one that never finishes its headers.
    let mut idle = Vec::new();
    for _ in 0..70 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let mut partial = tokio::net::TcpStream::connect(admin).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // Each is closed by the proxy (the last ones once the first have freed their slots).
    for stream in idle.iter_mut().chain(std::iter::once(&mut partial)) {
        let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut [0u8; 64]))
            .await
            .expect("the admin listener closes idle and unfinished connections");
        assert!(matches!(closed, Ok(0) | Err(_)));
    }
    let health = get(&http1_client(), &format!("http://{admin}/healthz")).await;
    assert_eq!(health.status, 200);
}

#[tokio::test(start_paused = true)]
async fn a_request_still_waiting_for_the_upstream_is_answered_before_the_grace_ends() {
    let harness = InProcess::new("", sim_with(Sim::builder().stall("/3/stall")).await);
    let start = tokio::time::Instant::now();
    let stalled = harness.spawn_get("/3/stall?api_key=LATE");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Shutdown: 2 s of grace left for answers, far less than the 10 s request_timeout.
    let now = tokio::time::Instant::now();
    harness
        .proxy
        .begin_drain(now + Duration::from_secs(1), now + Duration::from_secs(2));
    let reply = stalled.await.unwrap();
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["status_code"], 24);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}
