//! The admin listener, on its own address: `GET /` (the status page), `GET /status.json` (what
//! it shows), `GET /healthz` (the process is alive), `GET /readyz` (configured and listening;
//! 503 while draining), `GET /metrics` (Prometheus text format, or OpenMetrics when asked),
//! `POST /cache/purge[?prefix=...]` (empties the response cache, or part of it).
//!
//! Kept apart from the client listener so probes and scrapes never queue behind client traffic and
//! the admin port can stay on loopback or a pod-internal address.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::metrics;
use crate::proxy::Proxy;
use crate::server::{accept, idle};
use crate::status;

/// Most admin connections open at once: probes and scrapes need a handful. More wait in the
/// kernel's accept queue, so a flood of idle admin connections cannot use up the process's file
/// descriptors and stop the client listener.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves the admin endpoints until `shutdown` completes, with the client listener's header-read
/// and idle timeouts (`cfg`) and at most [`MAX_ADMIN_CONNECTIONS`] connections.
pub async fn run(
    listener: TcpListener,
    proxy: Proxy,
    cfg: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let idle_timeout = cfg.idle_timeout;
    accept::accept_until(
        &listener,
        "admin",
        Some(slots),
        shutdown,
        |stream, _, slot| {
            let (proxy, builder) = (proxy.clone(), builder.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let in_flight = idle::InFlight::default();
                let requests = in_flight.clone();
                let service = service_fn(move |req| {
                    let (proxy, busy) = (proxy.clone(), requests.enter());
                    async move {
                        let response = answer(&proxy, &req);
                        drop(busy);
                        Ok::<_, Infallible>(response)
                    }
                });
                let io = idle::IdleTimeout::new(stream, idle_timeout, in_flight);
                let _ = builder.serve_connection(TokioIo::new(io), service).await;
            });
        },
    )
    .await;
}

/// Answers one admin request.
pub fn answer<B>(proxy: &Proxy, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/cache/purge" {
        return purge(proxy, req);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/" => with_type(
            Bytes::from_static(status::PAGE.as_bytes()),
            "text/html; charset=utf-8",
        ),
        "/status.json" => match serde_json::to_vec(&proxy.status()) {
            Ok(json) => with_type(Bytes::from(json), "application/json"),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "status unavailable\n"),
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match proxy.readiness() {
            (true, body) => text(StatusCode::OK, body),
            (false, body) => text(StatusCode::SERVICE_UNAVAILABLE, body),
        },
        "/metrics" => {
            let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = metrics::Format::negotiate(accept);
            let mut response =
                Response::new(Full::new(Bytes::from(proxy.render_metrics_as(format))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /, /status.json, /healthz, /readyz or /metrics\n",
        ),
    }
}

/// `POST /cache/purge` empties the response cache; `?prefix=/3/movie/550` only entries whose
/// key (path and sorted query) starts with that. Answers with the number removed.
fn purge<B>(proxy: &Proxy, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /cache/purge[?prefix=/3/...]\n",
        );
    }
    let query = crate::tmdb::Query::parse(req.uri().query());
    let prefix = query.values("prefix").next().unwrap_or("").to_owned();
    // Only `prefix`, and not empty: a typo must not empty the whole cache.
    let other = query.pairs().iter().any(|p| p.name != "prefix");
    if other || (req.uri().query().is_some() && prefix.is_empty()) {
        return text(
            StatusCode::BAD_REQUEST,
            "POST /cache/purge empties the cache; ?prefix=/3/... only part of it\n",
        );
    }
    let removed = proxy.purge_cache(&prefix);
    let mut response = Response::new(Full::new(Bytes::from(format!(
        "{{\"removed\":{removed}}}\n"
    ))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A 200 with `body` as `content_type`, never cached (the figures change every second).
fn with_type(body: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
