//! What the response cache saves on a repeat-heavy trace: 10 app instances asking for movies
//! drawn from a Zipf distribution over 10,000 ids (a few popular titles, a long tail), through
//! the release proxy with its cache on, beside the same proxy with it off, in front of the same
//! stand-in. Each instance has its own key (limit 50/s, reject mode) and asks 200 times a second.
//! Reports the requests that reached the stand-in (each spent a token), the 200s answered without
//! one, and the answers by status each way.
//!
//! Run: `cargo bench --bench cache` (it builds and starts `target/release/tmdb-proxy`, stopped
//! by PID at the end).

#![allow(clippy::print_stdout)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{build_proxy, start_proxy};
use tmdb_proxy::sim::Sim;

const MOVIES: u64 = 10_000;
/// Each instance's key: TMDB's 50/s, refused at once beyond it.
const LIMIT: &str = "[limit]\nrequests_per_second = 50\nmode = \"reject\"\n";
const INSTANCES: usize = 10;
const PER_INSTANCE: usize = 1_500;
/// Each instance asks at 200 requests per second, four times its key's limit.
const EVERY: Duration = Duration::from_millis(5);
/// Zipf's exponent: about what title popularity looks like.
const SKEW: f64 = 1.0;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Zipf-distributed ids from 1 to `n`, by inverting the cumulative weights (deterministic).
struct Zipf {
    cumulative: Vec<f64>,
    state: u64,
}

impl Zipf {
    fn new(n: u64, skew: f64, seed: u64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / (k as f64).powf(skew);
                total
            })
            .collect();
        Self {
            cumulative,
            state: seed,
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self
            .state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let u = (self.state >> 11) as f64 / (1u64 << 53) as f64 * total;
        self.cumulative.partition_point(|&c| c < u) as u64 + 1
    }
}

/// Runs the trace through `addr`: returns the answers by 200 / 429 / other.
async fn trace(client: &HttpClient, addr: SocketAddr) -> (usize, usize, usize) {
    let tasks: Vec<_> = (0..INSTANCES)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut zipf = Zipf::new(MOVIES, SKEW, 42 + i as u64);
                let mut counts = (0, 0, 0);
                let mut tick = tokio::time::interval(EVERY);
                for _ in 0..PER_INSTANCE {
                    tick.tick().await;
                    let id = zipf.next();
                    // Each instance holds its own key, as app instances sharing one TMDB key
                    // through one proxy would hold the same: a key per instance is the harder case.
                    let uri = format!("http://{addr}/3/movie/{id}?api_key=APP{i}&language=en-US");
                    let response = client
                        .get(uri.parse().expect("a uri"))
                        .await
                        .expect("an answer");
                    match response.status().as_u16() {
                        200 => counts.0 += 1,
                        429 => counts.1 += 1,
                        _ => counts.2 += 1,
                    }
                    let _ = response.into_body().collect().await;
                }
                counts
            })
        })
        .collect();
    let mut total = (0, 0, 0);
    for task in tasks {
        let c = task.await.expect("an instance");
        total = (total.0 + c.0, total.1 + c.1, total.2 + c.2);
    }
    total
}

fn main() {
    support::block_on(bench());
}

async fn bench() {
    build_proxy();
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let requests = INSTANCES * PER_INSTANCE;
    println!(
        "cache: {INSTANCES} app instances, {requests} requests, Zipf (s = {SKEW}) over {MOVIES} movie ids; \
         limit 50/s per key, reject mode\n"
    );
    println!(
        "| proxy | reached the stand-in | 200s answered without a token | 200 / 429 / other |"
    );
    println!("|---|---|---|---|");
    for (name, extra) in [
        ("cache off", "[cache]\nenabled = false\n"),
        ("cache on", "[cache]\nenabled = true\n"),
    ] {
        let sim = Sim::builder()
            .keep_arrivals(requests + 10)
            .start()
            .await
            .expect("the stand-in starts");
        let (proxy, addr) = start_proxy(
            name,
            &sim.url(),
            "max_connections = 20",
            &format!("{LIMIT}{extra}"),
        );
        let (ok, limited, other) = trace(&client, addr).await;
        let reached = sim.hits();
        println!(
            "| {name} | {reached} ({:.1}%) | {} | {ok} / {limited} / {other} |",
            100.0 * reached as f64 / requests as f64,
            ok.saturating_sub(reached),
        );
        drop(proxy);
    }
}
