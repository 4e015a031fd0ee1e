//! What the shared budget costs: request latency through the proxy with its budget in Redis
//! (`[cluster]`) beside the same proxy with its local budget, in one run, in front of the same
//! stand-in, plus the stand-in reached directly.
//!
//! Both proxies are the release binary, stopped by PID at the end, as is the `redis-server` this
//! starts on a free loopback port. Requests spread over 1,000 keys, far under their limit, so no
//! request queues: what differs is the Redis call. Rounds alternate between targets (this machine
//! is shared and noisy, so compare within a run). For each target: p50 and p99 with one client
//! (sequential requests) and with 16 concurrent clients, and CPU per request of the proxy process.
//!
//! Run: `cargo bench --bench cluster` (needs `redis-server`).

#![allow(clippy::print_stdout)]

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{Stopped, build_proxy, free_port, start_proxy};
use tmdb_proxy::sim::Sim;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

const ROUNDS: usize = 3;
const SEQUENTIAL: usize = 2_000;
const CONCURRENT: usize = 16;
const PER_CLIENT: usize = 500;

/// User plus system CPU time of `pid` so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Latencies of `n` requests by each of `clients` concurrent clients.
async fn run(
    client: &HttpClient,
    addr: SocketAddr,
    clients: usize,
    n: usize,
    offset: usize,
) -> Vec<Duration> {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut took = Vec::with_capacity(n);
                for i in 0..n {
                    let key = (offset + c * n + i) % 1000;
                    let uri = format!("http://{addr}/3/movie/550?api_key=BENCHKEY{key}");
                    let sent = Instant::now();
                    let response = client
                        .get(uri.parse().expect("a uri"))
                        .await
                        .expect("an answer");
                    assert_eq!(response.status(), 200, "the bench stays under every limit");
                    let _ = response.into_body().collect().await;
                    took.push(sent.elapsed());
                }
                took
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("a client"));
    }
    all
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    pid: Option<u32>,
    sequential: Vec<Duration>,
    concurrent: Vec<Duration>,
    cpu: Duration,
    requests: usize,
}

fn main() {
    support::block_on(bench());
}

async fn bench() {
    build_proxy();
    let redis_port = free_port();
    let redis_dir =
        std::env::temp_dir().join(format!("tmdb-proxy-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&redis_dir).expect("a temporary directory");
    let redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&redis_dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let redis_pid = redis.id();
    let _redis = Stopped(redis);
    std::thread::sleep(Duration::from_millis(300));

    let sim = Sim::builder()
        .keep_arrivals(1000)
        .start()
        .await
        .expect("the stand-in starts");
    let (local, local_addr) = start_proxy("local", &sim.url(), "max_connections = 64", "");
    let shared_cfg = format!("[cluster]\nredis_url = \"redis://127.0.0.1:{redis_port}\"\n");
    let (shared, shared_addr) =
        start_proxy("shared", &sim.url(), "max_connections = 64", &shared_cfg);
    let mut targets = vec![
        Target {
            name: "stand-in direct",
            addr: sim.addr(),
            pid: None,
            sequential: vec![],
            concurrent: vec![],
            cpu: Duration::ZERO,
            requests: 0,
        },
        Target {
            name: "tmdb-proxy, local budget",
            addr: local_addr,
            pid: Some(local.0.id()),
            sequential: vec![],
            concurrent: vec![],
            cpu: Duration::ZERO,
            requests: 0,
        },
        Target {
            name: "tmdb-proxy, shared budget (Redis)",
            addr: shared_addr,
            pid: Some(shared.0.id()),
            sequential: vec![],
            concurrent: vec![],
            cpu: Duration::ZERO,
            requests: 0,
        },
    ];
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    // Warm-up: connections, and the script loaded into Redis.
    for target in &targets {
        run(&client, target.addr, 4, 50, 0).await;
    }
    let redis_cpu_before = cpu(redis_pid);
    for round in 0..ROUNDS {
        for target in &mut targets {
            let before = target.pid.map(cpu);
            let offset = round * 10_000;
            target
                .sequential
                .extend(run(&client, target.addr, 1, SEQUENTIAL, offset).await);
            target
                .concurrent
                .extend(run(&client, target.addr, CONCURRENT, PER_CLIENT, offset).await);
            if let (Some(pid), Some(before)) = (target.pid, before) {
                target.cpu += cpu(pid).saturating_sub(before);
            }
            target.requests += SEQUENTIAL + CONCURRENT * PER_CLIENT;
        }
    }
    let redis_cpu = cpu(redis_pid).saturating_sub(redis_cpu_before);

    println!(
        "cluster: request latency, local budget beside shared (Redis), {ROUNDS} interleaved rounds\n"
    );
    println!(
        "| target | 1 client p50 | 1 client p99 | {CONCURRENT} clients p50 | {CONCURRENT} clients p99 | CPU ms per 1,000 requests |"
    );
    println!("|---|---|---|---|---|---|");
    let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
    for target in &mut targets {
        target.sequential.sort_unstable();
        target.concurrent.sort_unstable();
        let per_1000 = match target.pid {
            Some(_) => format!(
                "{:.1}",
                target.cpu.as_secs_f64() * 1000.0 * 1000.0 / target.requests as f64
            ),
            None => "-".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {per_1000} |",
            target.name,
            ms(quantile(&target.sequential, 0.5)),
            ms(quantile(&target.sequential, 0.99)),
            ms(quantile(&target.concurrent, 0.5)),
            ms(quantile(&target.concurrent, 0.99)),
        );
    }
    let (l, s) = (&targets[1], &targets[2]);
    println!(
        "\nadded by the shared budget: p50 {} ms, p99 {} ms (one client); p50 {} ms, p99 {} ms ({CONCURRENT} clients)",
        ms(quantile(&s.sequential, 0.5).saturating_sub(quantile(&l.sequential, 0.5))),
        ms(quantile(&s.sequential, 0.99).saturating_sub(quantile(&l.sequential, 0.99))),
        ms(quantile(&s.concurrent, 0.5).saturating_sub(quantile(&l.concurrent, 0.5))),
        ms(quantile(&s.concurrent, 0.99).saturating_sub(quantile(&l.concurrent, 0.99))),
    );
    println!(
        "redis-server CPU: {:.1} ms per 1,000 requests through the shared proxy",
        redis_cpu.as_secs_f64() * 1e6 / s.requests as f64
    );
    drop((local, shared));
}
