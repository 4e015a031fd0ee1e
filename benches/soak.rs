//! Soak: the proxy binary under mixed, hostile traffic for a bounded time, in front of a TMDB
//! stand-in that enforces TMDB's own 50/s and misbehaves on some paths.
//!
//! Traffic, all at once: valid requests over five keys, one key far over its limit, invalid
//! requests (no key, bad page, foreign path, ambiguous credentials), malformed ones on raw
//! sockets (garbage, oversized headers, headers cut off), slow readers of a 2 MiB body, HTTP/2
//! clients, uploads the stand-in answers before reading them, and requests to paths where the
//! stand-in resets, breaks a body, stalls before or after its headers, closes the connection
//! after answering, or answers HTML. It prints requests sent, answers by status, lost answers
//! (a client that got neither an answer nor a closed connection), doubled answers (two responses
//! to one request), the most upstream connections open at once, the worst one-second window of
//! any key at the stand-in, and the proxy's resident memory at the first minute and at the end.
//!
//! Run: `cargo bench --bench soak -- --duration 5m` (default 5 minutes; it builds and starts
//! `target/release/tmdb-proxy`, stopped by PID at the end).

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tmdb_proxy::sim::{Fault, Sim, max_in_window};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The proxy's per-key limit in this run (the stand-in enforces TMDB's 50 behind it).
const LIMIT: usize = 40;
/// Upstream connections the proxy may open.
const MAX_CONNECTIONS: usize = 20;

type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// A kind of traffic: its name, how many clients send it, over which client, and the requests
/// (path and query, extra headers) they take turns with.
type Kind = (
    &'static str,
    usize,
    TestClient,
    Vec<(String, Vec<(&'static str, String)>)>,
);

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    lost: AtomicU64,
    doubled: AtomicU64,
    statuses: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn answered(&self, what: &str) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        *self
            .statuses
            .lock()
            .unwrap()
            .entry(what.to_owned())
            .or_default() += 1;
    }

    fn lost(&self, what: &str) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.lost.fetch_add(1, Ordering::Relaxed);
        eprintln!("lost: {what}");
    }
}

fn duration_arg() -> Duration {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--duration")
        .and_then(|i| args.get(i + 1))
        .and_then(|d| humantime::parse_duration(d).ok())
        .unwrap_or(Duration::from_secs(300))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends one raw HTTP/1.1 exchange and reads until the proxy closes or `within` passes; returns
/// how many responses began, or `None` if the connection neither answered nor closed.
async fn raw(addr: SocketAddr, request: &[u8], within: Duration) -> Option<usize> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.write_all(request).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut got)).await;
    let responses = got.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    match read {
        Ok(_) => Some(responses),
        Err(_) if responses > 0 => Some(responses),
        Err(_) => None,
    }
}

fn main() {
    let duration = duration_arg();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(soak(duration));
}

async fn soak(duration: Duration) {
    let built = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--bin", "tmdb-proxy"])
        .status()
        .expect("cargo runs");
    assert!(built.success(), "the proxy builds");

    let sim = (Sim::builder()
        .rate_limit(Some(50))
        .keep_arrivals(200_000)
        .fault("/3/reset", Fault::Close)
        .fault("/3/broken", Fault::BreakBody { length: 1_000_000 })
        .stall("/3/stall")
        // Headers and 64 KiB of a 320 KiB body, then nothing: the gate never opens.
        .stream("/3/stall-body", 64 * 1024, 5, Some(Arc::new(Notify::new())))
        // Closes its connection after answering, so pooled connections keep going away.
        .respond(
            "/3/closing",
            200,
            &[
                ("content-type", "application/json"),
                ("connection", "close"),
            ],
            "{}",
        )
        .fault(
            "/3/early",
            Fault::AnswerBeforeBody {
                read_after: Duration::from_millis(200),
            },
        )
        .respond(
            "/3/html",
            502,
            &[("content-type", "text/html")],
            "<html>edge</html>",
        )
        .stream("/3/big", 64 * 1024, 32, None))
    .start_on_own_thread()
    .expect("the stand-in starts");

    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tmdb-proxy-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nheader_read_timeout = \"5s\"\nidle_timeout = \"10s\"\n\
             max_header_bytes = \"16KiB\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [upstream]\nbase_url = \"{url}\"\nmax_connections = {MAX_CONNECTIONS}\nrequest_timeout = \"2s\"\n\
             [limit]\nrequests_per_second = {LIMIT}\nmode = \"queue\"\nmax_wait = \"500ms\"\n\
             [log]\nlevel = \"error\"\n",
            admin = free_port(),
            url = sim.url(),
        ),
    )
    .expect("the config is written");
    let mut proxy = tokio::process::Command::new("target/release/tmdb-proxy")
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the proxy starts");
    let pid = proxy.id().expect("a pid");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + duration;
    let http1 = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http::<Empty<Bytes>>();
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let url = |path: &str| format!("http://{addr}{path}");

    let mut tasks = Vec::new();
    // (client, path pattern, headers) for the ordinary kinds of traffic.
    let kinds: Vec<Kind> = vec![
        (
            "valid",
            10,
            http1.clone(),
            (0..5)
                .map(|k| (format!("/3/movie/{k}?api_key=SOAKKEY{k}"), vec![]))
                .collect(),
        ),
        (
            "over-limit",
            5,
            http1.clone(),
            vec![("/3/movie/1?api_key=HOTKEY".to_owned(), vec![])],
        ),
        (
            "invalid",
            2,
            http1.clone(),
            vec![
                ("/3/movie/1".to_owned(), vec![]),
                (
                    "/3/discover/movie?api_key=SOAKKEY0&page=0".to_owned(),
                    vec![],
                ),
                ("/5/elsewhere?api_key=SOAKKEY0".to_owned(), vec![]),
                ("/3/movie/1?api_key=A&api_key=B".to_owned(), vec![]),
                (
                    "/3/movie/1?api_key=SOAKKEY1".to_owned(),
                    vec![("authorization", "Bearer SOMEONEELSE".to_owned())],
                ),
            ],
        ),
        (
            "faults",
            2,
            http1.clone(),
            vec![
                ("/3/reset?api_key=FAULTKEY".to_owned(), vec![]),
                ("/3/broken?api_key=FAULTKEY".to_owned(), vec![]),
                ("/3/stall?api_key=FAULTKEY".to_owned(), vec![]),
                ("/3/html?api_key=FAULTKEY".to_owned(), vec![]),
                ("/3/stall-body?api_key=FAULTKEY".to_owned(), vec![]),
                ("/3/closing?api_key=FAULTKEY".to_owned(), vec![]),
            ],
        ),
        (
            "http2",
            2,
            h2.clone(),
            (0..5)
                .map(|k| (format!("/3/tv/{k}?api_key=SOAKKEY{k}"), vec![]))
                .collect(),
        ),
    ];
    for (kind, workers, client, requests) in kinds {
        let requests = Arc::new(requests);
        for worker in 0..workers {
            let (client, requests, tally) = (client.clone(), requests.clone(), tally.clone());
            let urls: Vec<String> = requests.iter().map(|(p, _)| url(p)).collect();
            tasks.push(tokio::spawn(async move {
                let mut i = worker;
                while Instant::now() < deadline {
                    let (_, headers) = &requests[i % requests.len()];
                    let mut req = Request::get(&urls[i % urls.len()]);
                    for (name, value) in headers {
                        req = req.header(*name, value.as_str());
                    }
                    i += 1;
                    let req = req.body(Empty::new()).unwrap();
                    match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                        Ok(Ok(response)) => {
                            let status = response.status().as_u16();
                            let body = response.into_body().collect().await;
                            match (body, kind) {
                                (Ok(_), _) => tally.answered(&format!("{kind} {status}")),
                                // A body broken upstream closes the client's connection.
                                (Err(_), "faults") => {
                                    tally.answered(&format!("{kind} {status}, body cut"))
                                }
                                (Err(error), _) => tally.lost(&format!("{kind}: body {error}")),
                            }
                            if status == 429 && kind == "over-limit" {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        Ok(Err(error)) => tally.lost(&format!("{kind}: {error}")),
                        Err(_) => tally.lost(&format!("{kind}: no answer in 10 s")),
                    }
                }
            }));
        }
    }
    // Uploads of 512 KiB, answered by the stand-in before it reads them.
    let uploader = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let upload = Bytes::from(vec![b' '; 512 * 1024]);
    for _ in 0..2 {
        let (client, upload, tally) = (uploader.clone(), upload.clone(), tally.clone());
        let target = url("/3/early?api_key=UPLOADKEY");
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let req = Request::post(&target)
                    .header("content-type", "application/json")
                    .body(Full::new(upload.clone()))
                    .unwrap();
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(response)) => {
                        let status = response.status().as_u16();
                        match response.into_body().collect().await {
                            Ok(_) => tally.answered(&format!("uploads {status}")),
                            Err(error) => tally.lost(&format!("uploads: body {error}")),
                        }
                    }
                    Ok(Err(error)) => tally.lost(&format!("uploads: {error}")),
                    Err(_) => tally.lost("uploads: no answer in 10 s"),
                }
            }
        }));
    }
    // Malformed requests and slow readers, on raw sockets.
    let raws: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x16\x03\x01\x00garbage\r\n\r\n".to_vec()),
        ("oversized headers", {
            let mut r = b"GET /3/movie/1?api_key=SOAKKEY0 HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
            r.extend(std::iter::repeat_n(b'p', 20_000));
            r.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
            r
        }),
        (
            "headers cut off",
            b"GET /3/movie/1?api_key=SOAKKEY0 HTTP/1.1\r\nHost: x\r\n".to_vec(),
        ),
    ];
    for (kind, request) in raws {
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match raw(addr, &request, Duration::from_secs(8)).await {
                    Some(0) => tally.answered(&format!("{kind}: closed")),
                    Some(1) => tally.answered(&format!("{kind}: one answer")),
                    Some(_) => {
                        tally.answered(&format!("{kind}: doubled"));
                        tally.doubled.fetch_add(1, Ordering::Relaxed);
                    }
                    None => tally.lost(&format!("{kind}: neither answer nor close")),
                }
            }
        }));
    }
    for _ in 0..2 {
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    continue;
                };
                let _ = stream
                    .write_all(b"GET /3/big?api_key=SLOWKEY HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = 0;
                loop {
                    match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await {
                        Ok(Ok(0)) => break,
                        Ok(Ok(n)) => got += n,
                        _ => {
                            tally.lost("slow reader: stalled");
                            break;
                        }
                    }
                    // About 160 KB/s.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tally.answered(if got > 2 << 20 { "slow reader: whole body" } else { "slow reader: cut" });
            }
        }));
    }

    // Every 10 s: the worst second of any key at the stand-in, and the proxy's memory.
    let mut worst = 0;
    let mut worst_key = String::new();
    // The shortest time any key's LIMIT + 1 consecutive arrivals took: at least a second when
    // the limit holds (the proxy spaces them by a second and `window_margin`).
    let mut tightest = Duration::MAX;
    let mut rss_first_minute = 0;
    let mut carried: HashMap<String, Vec<Instant>> = HashMap::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(10).min(deadline - Instant::now())).await;
        for arrival in sim.take_arrivals() {
            carried
                .entry(arrival.credential.unwrap_or_default())
                .or_default()
                .push(arrival.at);
        }
        for (key, times) in &mut carried {
            let w = max_in_window(times, Duration::from_secs(1));
            if w > worst {
                (worst, worst_key) = (w, key.clone());
            }
            times.sort_unstable();
            if let Some(span) = times.windows(LIMIT + 1).map(|w| w[LIMIT] - w[0]).min() {
                tightest = tightest.min(span);
            }
            // Keep the last two seconds, for windows and spans across the slices.
            let keep_from = Instant::now() - Duration::from_secs(2);
            times.retain(|&t| t >= keep_from);
        }
        if rss_first_minute == 0 && start.elapsed() >= Duration::from_secs(60).min(duration / 2) {
            rss_first_minute = rss_kib(pid);
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let rss_end = rss_kib(pid);
    let _ = proxy.kill().await;
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "soak: {} with {} s of mixed traffic",
        env!("CARGO_PKG_NAME"),
        duration.as_secs()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| requests sent | {} |", tally.sent.load(Ordering::Relaxed));
    println!("| lost answers | {} |", tally.lost.load(Ordering::Relaxed));
    println!(
        "| doubled answers | {} |",
        tally.doubled.load(Ordering::Relaxed)
    );
    println!(
        "| most upstream connections open at once | {} (cap {MAX_CONNECTIONS}) |",
        sim.max_open_connections()
    );
    println!(
        "| worst one-second window of a key at the stand-in | {worst} ({worst_key}; limit {LIMIT}) |"
    );
    println!(
        "| shortest span of {} consecutive arrivals of a key | {:.3} s |",
        LIMIT + 1,
        tightest.as_secs_f64()
    );
    println!(
        "| proxy RSS at minute 1 / at the end | {:.1} / {:.1} MiB ({:+.1}%) |",
        rss_first_minute as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        (rss_end as f64 / rss_first_minute.max(1) as f64 - 1.0) * 100.0
    );
    println!();
    println!("| answers | count |");
    println!("|---|---|");
    for (what, count) in tally.statuses.lock().unwrap().iter() {
        println!("| {what} | {count} |");
    }
}
