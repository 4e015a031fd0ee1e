//! What operators look at, checked by the tools that consume it: the `/metrics` scrape by
//! `promtool check metrics`, the alert rules by `promtool test rules`, the Grafana dashboard's
//! queries against the metrics the proxy exports, and the status page in headless Chromium.
//! Each test runs the proxy (with aliases, apps, the cache and a shared budget on a
//! `redis-server` of its own, so that every metric family exists) in front of the stand-in.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::redis::RedisServer;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::Command;

const WEB_KEY: &str = "web-key-secret-0001";
const APP_TOKEN: &str = "scraper-token-secret-0002";

/// A proxy with every metric family in use, and its admin listener.
struct Observed {
    proxy: Running,
    admin: std::net::SocketAddr,
    _redis: RedisServer,
    _sim: tmdb_proxy::sim::Sim,
}

async fn observed() -> Observed {
    let sim = sim().await;
    let redis = RedisServer::start();
    let toml = format!(
        "[keys.aliases]\nweb = \"{WEB_KEY}\"\n\
         [cluster]\nredis_url = \"{}\"\nnamespace = \"obs\"\n\
         [cache]\nenabled = true\n\
         [[clients.apps]]\nname = \"scraper\"\ntoken = \"{APP_TOKEN}\"\napi_key = \"{WEB_KEY}\"\n\
         share = 1\nrequests_per_second = 20\n",
        redis.url()
    );
    let proxy = spawn_proxy(&toml, &sim.url()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let cfg = tmdb_proxy::config::Config::from_toml_str("")
        .unwrap()
        .server;
    let served = proxy.proxy.clone();
    tokio::spawn(async move {
        tmdb_proxy::admin::run(listener, served, &cfg, std::future::pending()).await;
    });
    Observed {
        proxy,
        admin,
        _redis: redis,
        _sim: sim,
    }
}

impl Observed {
    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Some of everything: forwarded, cached, limited, an app's requests, an invalid one.
    async fn traffic(&self) {
        let client = http1_client();
        for i in 0..5 {
            let url = self
                .proxy
                .url(&format!("/3/movie/{}?api_key={WEB_KEY}", 550 + i % 2));
            assert_eq!(get(&client, &url).await.status, 200);
        }
        let app = self.proxy.url("/3/movie/603");
        let reply = get_with(&client, &app, &[("x-proxy-token", APP_TOKEN)]).await;
        assert_eq!(reply.status, 200);
        let bad = self.proxy.url("/3/movie/550?api_key=k&page=0");
        assert_eq!(get(&client, &bad).await.status, 400);
    }

    async fn scrape(&self, accept: Option<&str>) -> Reply {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        get_with(&http1_client(), &self.admin_url("/metrics"), &headers).await
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs promtool with `args`, `stdin` fed to it; returns its exit success and its output.
async fn promtool(args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo("."))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool runs (apt-get install prometheus)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("promtool finishes")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The metric names a classic-format scrape exports, histogram series included.
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The `tmdb_proxy_*` names a PromQL expression uses.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tmdb_proxy_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_scrape_passes_promtool_and_speaks_both_formats() {
    let observed = observed().await;
    observed.traffic().await;

    let classic = observed.scrape(None).await;
    assert_eq!(classic.status, 200);
    assert_eq!(
        classic.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let (ok, lint) = promtool(&["check", "metrics"], &classic.body).await;
    assert!(
        ok && lint.trim().is_empty(),
        "promtool: {lint}\n{}",
        classic.text()
    );
    let text = classic.text();
    // Every family has its HELP and TYPE under the name its samples carry.
    for name in exported(text) {
        if !name.ends_with("_bucket") && !name.ends_with("_sum") && !name.ends_with("_count") {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
    }
    for family in [
        "tmdb_proxy_requests_total",
        "tmdb_proxy_upstream_connections",
        "tmdb_proxy_upstream_max_connections",
        "tmdb_proxy_upstream_pauses_total",
        "tmdb_proxy_key_limit_requests_per_second",
        "tmdb_proxy_budget_mode",
        "tmdb_proxy_cache_requests_total",
        "tmdb_proxy_app_requests_total",
    ] {
        assert!(exported(text).contains(family), "{family} missing:\n{text}");
    }
    assert!(text.contains(r#"tmdb_proxy_key_limit_requests_per_second{alias="web"} 50"#));
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    assert!(!text.contains(WEB_KEY) && !text.contains(APP_TOKEN));

    // Prometheus asks for OpenMetrics first; it gets it, with the families named without `_total`.
    let open = observed
        .scrape(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        ))
        .await;
    assert_eq!(
        open.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(open.text().ends_with("# EOF\n"));
    assert!(open.text().contains("# TYPE tmdb_proxy_requests counter"));
    // Refused with q=0, OpenMetrics is not served.
    let refused = observed
        .scrape(Some("application/openmetrics-text;q=0, text/plain"))
        .await;
    assert_eq!(
        refused.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
}

#[tokio::test]
async fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = "deploy/prometheus/tmdb-proxy-rules.yaml";
    let (ok, out) = promtool(&["check", "rules", rules], b"").await;
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
    let (ok, out) = promtool(
        &[
            "test",
            "rules",
            "deploy/prometheus/tmdb-proxy-rules.test.yaml",
        ],
        b"",
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_of_the_dashboard_and_the_rules_names_an_exported_metric() {
    let observed = observed().await;
    observed.traffic().await;
    let exported = exported(observed.scrape(None).await.text());

    let text = std::fs::read_to_string(repo("deploy/grafana/tmdb-proxy.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "tmdb-proxy");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = 0;
    let mut titles = BTreeSet::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(titles.insert(title), "two panels titled {title}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = metrics_in(expr);
            assert!(
                !names.is_empty(),
                "{title}: {expr} names no tmdb_proxy metric"
            );
            for name in names {
                assert!(exported.contains(&name), "{title}: {name} is not exported");
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    // What the issue asks the dashboard to show.
    for wanted in [
        "tmdb_proxy_key_requests_total",
        "tmdb_proxy_requests_total",
        "tmdb_proxy_upstream_latency_seconds_bucket",
        "tmdb_proxy_queue_waiting",
        "tmdb_proxy_upstream_connections",
        "tmdb_proxy_cache_requests_total",
        "tmdb_proxy_budget_mode",
    ] {
        assert!(text.contains(wanted), "the dashboard shows no {wanted}");
    }

    let rules = std::fs::read_to_string(repo("deploy/prometheus/tmdb-proxy-rules.yaml")).unwrap();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for name in metrics_in(line) {
            assert!(exported.contains(&name), "rules: {name} is not exported");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_counts_the_last_minute_by_alias_and_app_and_never_shows_a_key() {
    let observed = observed().await;
    let client = http1_client();
    let page = get(&client, &observed.admin_url("/")).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    // Works offline: nothing is fetched from anywhere but the admin listener (the one URL in
    // it is the SVG namespace, a name, not a fetch).
    let without_namespace = page.text().replace("\"http://www.w3.org/2000/svg\"", "");
    for external in ["src=", "href=", "http://", "https://", "@import", "url("] {
        assert!(
            !without_namespace.contains(external),
            "the page has {external}"
        );
    }

    let before = get(&client, &observed.admin_url("/status.json"))
        .await
        .json();
    assert_eq!(before["all"]["requests"], 0);
    observed.traffic().await;
    let reply = get(&client, &observed.admin_url("/status.json")).await;
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let status = reply.json();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["ready"], true);
    assert_eq!(status["all"]["requests"], 7);
    // Two movies for the alias (the rest are cache hits) and one for the app; the per-second
    // counts show whole seconds only, so some of these may still be counting.
    assert_eq!(status["all"]["sent_total"], 3, "{status}");
    let seconds = status["all"]["sent"].as_array().unwrap();
    assert_eq!(seconds.len(), 60);
    assert!(seconds.iter().map(|n| n.as_u64().unwrap()).sum::<u64>() <= 3);
    let web = &status["keys"][0];
    assert_eq!(
        (web["name"].as_str(), web["kind"].as_str()),
        (Some("web"), Some("key"))
    );
    assert_eq!(web["limit"], 50);
    // The app spends the alias's key, so its request counts there too.
    assert_eq!(web["requests"], 6);
    let app = &status["apps"][0];
    assert_eq!(app["name"], "scraper");
    assert_eq!(
        (app["limit"].as_u64(), app["queued"].as_u64()),
        (Some(20), Some(0))
    );
    assert_eq!(app["requests"], 1);
    assert_eq!(status["upstream"]["max"], 20);
    assert_eq!(status["cache"]["hits"], 3);
    assert_eq!(status["cluster"]["mode"], "shared");
    let text = reply.text();
    assert!(!text.contains(WEB_KEY) && !text.contains(APP_TOKEN));
}

/// Debian's Chromium (or the name other distributions give it).
fn chromium() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return name.to_owned();
        }
    }
    panic!("headless Chromium runs the status page test: apt-get install chromium");
}

/// Loads `url` in headless Chromium for `budget` of virtual time (the page's timers run that
/// long, network waits not counted) and returns the DOM as the scripts left it.
async fn dump_dom(url: &str, budget: Duration) -> String {
    let profile = tempdir("chromium-profile");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("chromium finishes")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tmdb-proxy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The value of `attribute="..."` on the first element that has it.
fn attribute<'a>(dom: &'a str, attribute: &str) -> Option<&'a str> {
    let start = dom.find(&format!(" {attribute}=\""))? + attribute.len() + 3;
    let end = dom[start..].find('"')? + start;
    Some(&dom[start..end])
}

/// The text of the element with `id`.
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[at..].find('>')? + at + 1;
    let end = dom[start..].find('<')? + start;
    Some(&dom[start..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_its_chart_and_updates_in_headless_chromium() {
    let observed = Arc::new(observed().await);
    observed.traffic().await;
    // Requests keep arriving, as fast as they are answered, while the browser polls: its
    // timers run on virtual time, so only a few milliseconds pass between two polls.
    let done = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|n| {
            let (observed, done) = (observed.clone(), done.clone());
            tokio::spawn(async move {
                let client = http1_client();
                for i in 0..100_000u32 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let movie = (i * 4 + n) % 50;
                    let url = observed
                        .proxy
                        .url(&format!("/3/movie/{movie}?api_key={WEB_KEY}"));
                    let _ = get(&client, &url).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dom = dump_dom(&observed.admin_url("/?every=500"), Duration::from_secs(6)).await;
    done.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    let refreshes: u32 = attribute(&dom, "data-refreshes")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refresh count in\n{dom}"));
    assert!(refreshes >= 3, "{refreshes} refreshes\n{dom}");
    let first: u64 = attribute(&dom, "data-first-requests")
        .unwrap()
        .parse()
        .unwrap();
    let last: u64 = attribute(&dom, "data-requests").unwrap().parse().unwrap();
    assert!(
        last > first,
        "the numbers update: {first} then {last} over {refreshes} refreshes"
    );
    assert!(first >= 7);
    // One chart per series (all, the alias, the app), each 60 seconds wide, with its lines.
    assert_eq!(dom.matches("<svg class=\"chart\"").count(), 3, "{dom}");
    assert_eq!(attribute(&dom, "data-points"), Some("60"));
    let sent = dom
        .split("<polyline class=\"sent\" points=\"")
        .nth(1)
        .unwrap();
    assert_eq!(sent.split('"').next().unwrap().split(' ').count(), 60);
    assert!(
        dom.contains("<line class=\"limit\""),
        "the limit line is drawn"
    );
    assert!(dom.contains("data-name=\"web\"") && dom.contains("data-name=\"scraper\""));
    assert_eq!(text_of(&dom, "version"), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(text_of(&dom, "budget-mode"), Some("shared (Redis)"));
    assert_eq!(
        text_of(&dom, "connections").map(|t| t.ends_with("/ 20")),
        Some(true)
    );
    assert_eq!(text_of(&dom, "error"), Some(""));
    assert!(!dom.contains(WEB_KEY));
}
