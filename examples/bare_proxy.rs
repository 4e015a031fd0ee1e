//! The framework's own cost, for `benches/load.sh`: the least a reverse proxy on hyper and tokio
//! does per request, with nothing of tmdb-proxy in it. hyper-util's server (HTTP/1.1 and h2c) on
//! a two-worker runtime, every request passed to one plain-HTTP upstream through hyper-util's
//! pooled client, the response streamed back as it comes. No limits, no header rewriting beyond
//! the target URI, no timeouts, no logging, no metrics.
//!
//!   cargo run --release --example bare_proxy -- 127.0.0.1:8080 127.0.0.1:9090 64
//!
//! Arguments: listen address, upstream address, idle upstream connections kept.

use std::net::SocketAddr;

use http::{Request, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN UPSTREAM [IDLE_CONNECTIONS]";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let idle: usize = args.next().map_or(Ok(64), |n| n.parse())?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream, idle))
}

async fn serve(listen: SocketAddr, upstream: SocketAddr, idle: usize) -> Result<(), BoxError> {
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(idle)
        .build_http();
    let authority = upstream.to_string();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                let target = Uri::builder()
                    .scheme("http")
                    .authority(authority.as_str())
                    .path_and_query(req.uri().path_and_query().map_or("/", |pq| pq.as_str()))
                    .build();
                async move {
                    *req.uri_mut() = target.map_err(|e| e.to_string())?;
                    *req.version_mut() = http::Version::HTTP_11;
                    client.request(req).await.map_err(|e| e.to_string())
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
