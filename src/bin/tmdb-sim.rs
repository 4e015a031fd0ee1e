//! `tmdb-sim`: run the TMDB stand-in on its own, to try the proxy offline.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tmdb_proxy::sim::Sim;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A TMDB stand-in: TMDB-shaped JSON, TMDB's own 429s, offline"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9099")]
    listen: SocketAddr,
    /// Enforce TMDB's limit: requests per key per second (0 disables).
    #[arg(long, default_value_t = 50)]
    rate_limit: u32,
    /// Delay before every answer, e.g. "20ms".
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|filter| !filter.trim().is_empty())
        .unwrap_or_else(|| "info".to_owned());
    tmdb_proxy::telemetry::init(&filter, "RUST_LOG", tmdb_proxy::config::LogFormat::Text);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(listen = %args.listen, %error, "cannot bind");
            return ExitCode::from(69);
        }
    };
    // It counts requests but remembers none: a benchmark sends tens of thousands a second.
    let sim = match Sim::builder()
        .keep_arrivals(1)
        .rate_limit((args.rate_limit > 0).then_some(args.rate_limit))
        .latency(args.latency)
        .start_on(listener)
    {
        Ok(sim) => sim,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::from(69);
        }
    };
    tracing::info!(url = %sim.url(), rate_limit = args.rate_limit, "tmdb-sim listening");
    tmdb_proxy::server::shutdown::signal().await;
    tracing::info!(requests = sim.hits(), "tmdb-sim stopped");
    ExitCode::SUCCESS
}
