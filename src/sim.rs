//! `tmdb-sim`: a TMDB stand-in for tests and offline demos.
//!
//! A small in-process hyper server that answers TMDB-shaped JSON, checks that a key is present,
//! can enforce TMDB's own per-key limit (answering 429 with code 25, as TMDB does), and records
//! what arrived and when, so tests can measure what the proxy let through. Behaviours for tests are
//! set per path: a fixed answer, a slow streamed body, or a stall.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::limiter::key::{api_key_param, bearer_token};
use crate::tmdb::ErrorBody;
use crate::tmdb::status::{self, code};

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When its headers arrived.
    pub at: Instant,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// The `api_key` parameter, else the bearer token, as sent.
    pub credential: Option<String>,
    pub headers: HeaderMap,
    /// The request body, read whole.
    pub body: Bytes,
}

/// How the stand-in answers one path.
#[derive(Debug, Clone)]
pub enum Route {
    /// A fixed status, headers and body.
    Fixed {
        status: StatusCode,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// `chunks` chunks of `chunk_size` bytes. With a gate, the first chunk is sent, then the rest
    /// only after the gate is notified (to prove a body streams through the proxy).
    Stream {
        chunk_size: usize,
        chunks: usize,
        gate: Option<Arc<Notify>>,
    },
    /// Never answers.
    Stall,
}

impl Route {
    /// A JSON answer with TMDB's content type.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Self::Fixed {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            headers: vec![("content-type".into(), status::CONTENT_TYPE.into())],
            body: body.into(),
        }
    }
}

/// Stand-in settings.
#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    /// Enforce TMDB's own limit: at most this many requests per key in any one-second window.
    pub rate_limit: Option<u32>,
    /// Delay before every answer.
    pub latency: Duration,
    /// Answers by path, overriding the built-in TMDB-like ones.
    pub routes: HashMap<String, Route>,
}

#[derive(Debug, Default)]
struct State {
    arrivals: Mutex<Vec<Arrival>>,
    /// Per-credential arrival times inside the last second, for `rate_limit`.
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    open: AtomicUsize,
    max_open: AtomicUsize,
    accepted: AtomicUsize,
}

/// A running stand-in. Dropping it stops the accept loop.
#[derive(Debug)]
pub struct Sim {
    addr: SocketAddr,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sim {
    /// Starts on `listener` and serves until dropped.
    pub fn start(listener: TcpListener, cfg: SimConfig) -> std::io::Result<Self> {
        Self::spawn(listener, cfg, None)
    }

    /// Starts on `listener`, speaking HTTPS with `tls` (tests of the proxy's upstream TLS).
    pub fn start_tls(
        listener: TcpListener,
        cfg: SimConfig,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        Self::spawn(listener, cfg, Some(tokio_rustls::TlsAcceptor::from(tls)))
    }

    fn spawn(
        listener: TcpListener,
        cfg: SimConfig,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(accept_loop(
            listener,
            Arc::new(cfg),
            state.clone(),
            stopped,
            tls,
        ));
        Ok(Self {
            addr,
            state,
            _stop: stop,
        })
    }

    /// Binds `127.0.0.1:0` and starts.
    pub async fn start_local(cfg: SimConfig) -> std::io::Result<Self> {
        Self::start(TcpListener::bind("127.0.0.1:0").await?, cfg)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` URL of the stand-in.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.state.arrivals).clone()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        lock(&self.state.arrivals).len()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Most connections ever open at once.
    pub fn max_open_connections(&self) -> usize {
        self.state.max_open.load(Ordering::SeqCst)
    }

    /// Connections accepted in total.
    pub fn accepted_connections(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

/// The largest number of arrivals in any window of length `window`, over `times` (any order).
pub fn max_in_window(times: &[Instant], window: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

async fn accept_loop(
    listener: TcpListener,
    cfg: Arc<SimConfig>,
    state: Arc<State>,
    mut stopped: oneshot::Receiver<()>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = &mut stopped => return,
        };
        let open = state.open.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_open.fetch_max(open, Ordering::SeqCst);
        state.accepted.fetch_add(1, Ordering::SeqCst);
        let (cfg, state, tls) = (cfg.clone(), state.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve(stream, cfg, state.clone()).await;
                    }
                }
                None => serve(stream, cfg, state.clone()).await,
            }
            state.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Serves one connection, HTTP/1.1 or HTTP/2.
async fn serve<IO>(io: IO, cfg: Arc<SimConfig>, state: Arc<State>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let (cfg, state) = (cfg.clone(), state.clone());
        async move { Ok::<_, Infallible>(answer(req, &cfg, &state).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

async fn answer(req: Request<Incoming>, cfg: &SimConfig, state: &State) -> Response<SimBody> {
    let now = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let req = Request::from_parts(parts, ());
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let credential = query
        .as_deref()
        .and_then(api_key_param)
        .map(|k| k.into_owned())
        .or_else(|| bearer_token(req.headers()).map(str::to_owned));
    lock(&state.arrivals).push(Arrival {
        at: now,
        method: req.method().clone(),
        path: path.clone(),
        query: query.clone(),
        credential: credential.clone(),
        headers: req.headers().clone(),
        body,
    });

    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    if let Some(route) = cfg.routes.get(&path) {
        return route_response(route).await;
    }
    let Some(credential) = credential else {
        return tmdb_error(ErrorBody::for_code(code::INVALID_API_KEY));
    };
    if let Some(limit) = cfg.rate_limit {
        let mut windows = lock(&state.windows);
        let window = windows.entry(credential).or_default();
        while window
            .front()
            .is_some_and(|&t| now - t >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() >= limit as usize {
            let count = window.len() as u64 + 1;
            drop(windows);
            let mut response = tmdb_error(ErrorBody::rate_limited(count, u64::from(limit)));
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return response;
        }
        window.push_back(now);
    }
    match builtin(&path, query.as_deref()) {
        Some(json) => json_response(StatusCode::OK, json),
        None => tmdb_error(ErrorBody::for_code(code::NOT_FOUND)),
    }
}

/// TMDB-like answers for a few endpoints a demo or a client library's smoke test calls.
fn builtin(path: &str, query: Option<&str>) -> Option<String> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["3", "configuration"] => Some(
            r#"{"images":{"base_url":"http://image.tmdb.org/t/p/","secure_base_url":"https://image.tmdb.org/t/p/","poster_sizes":["w92","w154","w185","w342","w500","w780","original"]},"change_keys":[]}"#
                .to_owned(),
        ),
        ["3", kind @ ("movie" | "tv"), id] => {
            let id: u64 = id.parse().ok()?;
            let title_field = if *kind == "movie" { "title" } else { "name" };
            Some(format!(
                r#"{{"id":{id},"{title_field}":"Simulated {kind} {id}","overview":"Served by tmdb-sim.","vote_average":7.5,"adult":false}}"#
            ))
        }
        ["3", "search", kind] => {
            let term = query
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "query"))
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let term = serde_json::to_string(&term).unwrap_or_else(|_| "\"\"".into());
            Some(format!(
                r#"{{"page":1,"results":[{{"id":550,"media_type":"{kind}","title":{term}}}],"total_pages":1,"total_results":1}}"#
            ))
        }
        _ => None,
    }
}

async fn route_response(route: &Route) -> Response<SimBody> {
    match route {
        Route::Fixed {
            status,
            headers,
            body,
        } => {
            let mut response = Response::new(SimBody::Full(Some(body.clone())));
            *response.status_mut() = *status;
            for (name, value) in headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    response.headers_mut().append(n, v);
                }
            }
            response
        }
        Route::Stream {
            chunk_size,
            chunks,
            gate,
        } => {
            let (tx, rx) = mpsc::channel(2);
            let (chunk, chunks, gate) =
                (Bytes::from(vec![b'x'; *chunk_size]), *chunks, gate.clone());
            tokio::spawn(async move {
                for i in 0..chunks {
                    if tx.send(chunk.clone()).await.is_err() {
                        return;
                    }
                    if i == 0
                        && let Some(gate) = &gate
                    {
                        gate.notified().await;
                    }
                }
            });
            let mut response = Response::new(SimBody::Channel(rx));
            response
                .headers_mut()
                .insert("content-length", HeaderValue::from(chunk_size * chunks));
            response
        }
        Route::Stall => std::future::pending().await,
    }
}

fn json_response(status: StatusCode, json: impl Into<Bytes>) -> Response<SimBody> {
    let mut response = Response::new(SimBody::Full(Some(json.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static(status::CONTENT_TYPE),
    );
    response
}

fn tmdb_error(body: ErrorBody) -> Response<SimBody> {
    json_response(body.http, body.to_json())
}

/// The stand-in's response body.
#[derive(Debug)]
pub enum SimBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Channel(rx) => rx.poll_recv(cx).map(|c| c.map(|d| Ok(Frame::data(d)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_in_window_counts_half_open_windows() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let times = [ms(0), ms(500), ms(999), ms(1000), ms(1001)];
        assert_eq!(max_in_window(&times, Duration::from_secs(1)), 4);
        assert_eq!(max_in_window(&[], Duration::from_secs(1)), 0);
    }
}
