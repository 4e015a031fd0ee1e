//! `tmdb-sim`: a TMDB stand-in for tests and offline demos.
//!
//! A small in-process hyper server that answers TMDB-shaped JSON, checks that a key is present,
//! can enforce TMDB's own per-key limit (answering 429 with code 25, as TMDB does), and records
//! what arrived and when, so tests can measure what the proxy let through. It is configured with
//! a builder, including bad behaviours per path:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use tmdb_proxy::sim::{Fault, Sim};
//! let sim = Sim::builder()
//!     .latency(Duration::from_millis(20))
//!     .json("/3/movie/550", 200, r#"{"id":550}"#)
//!     .stall("/3/slow")
//!     .fault("/3/broken", Fault::BreakBody { length: 100_000 })
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! It listens on `127.0.0.1:0`, and [`Sim::dialer`] also reaches it through an in-memory pipe, for
//! tests that run the proxy on paused time.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::server::accept;
use crate::tmdb::status::{self, code};
use crate::tmdb::{ErrorBody, Query, auth};
use crate::upstream::{Dialer, MemoryIo};

/// Keys whose arrivals are tracked for `rate_limit` before idle ones are forgotten.
const MAX_TRACKED_KEYS: usize = 10_000;

/// Bytes an in-memory connection buffers each way before a writer waits.
const PIPE_BUFFER: usize = 64 * 1024;

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When its headers arrived.
    pub at: Instant,
    pub method: Method,
    /// The request target as it arrived: origin-form (`/3/movie/550?...`) or absolute-form.
    pub target: String,
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
    /// Misbehaves.
    Fault(Fault),
}

/// A way for an upstream to fail an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Closes the connection without answering.
    Close,
    /// Sends 200 headers declaring a `Content-Length` of `length` and a few bytes, then breaks
    /// the body.
    BreakBody { length: u64 },
    /// Answers 200 (`{}`) at once and reads the request body only `read_after` later, as a
    /// server that answers an upload before it has taken it in. Until then the connection cannot
    /// carry another request. The arrival is recorded with the body as it was read.
    AnswerBeforeBody { read_after: Duration },
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

    /// A fixed answer with these headers.
    pub fn with_headers(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Self {
        Self::Fixed {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            headers: headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            body: body.into(),
        }
    }
}

/// Stand-in settings, gathered by [`SimBuilder`].
#[derive(Debug, Clone, Default)]
struct SimConfig {
    /// Enforce TMDB's own limit: at most this many requests per key in any one-second window.
    rate_limit: Option<u32>,
    /// Delay before every answer.
    latency: Duration,
    /// Delay before an in-memory connection is open (a TCP connect and TLS handshake).
    connect_latency: Duration,
    /// Most arrivals remembered (the oldest go first); `None`: all.
    keep_arrivals: Option<usize>,
    /// Answers by path, overriding the built-in TMDB-like ones.
    routes: HashMap<String, Route>,
}

/// Builds a [`Sim`].
#[derive(Debug, Default)]
pub struct SimBuilder {
    cfg: SimConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl SimBuilder {
    /// Answers `path` as `route` says.
    pub fn route(mut self, path: &str, route: Route) -> Self {
        self.cfg.routes.insert(path.to_owned(), route);
        self
    }

    /// Answers `path` with `status` and a JSON body.
    pub fn json(self, path: &str, status: u16, body: impl Into<Bytes>) -> Self {
        self.route(path, Route::json(status, body))
    }

    /// Answers `path` with `status`, these headers, and `body`.
    pub fn respond(
        self,
        path: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Self {
        self.route(path, Route::with_headers(status, headers, body))
    }

    /// Never answers `path`.
    pub fn stall(self, path: &str) -> Self {
        self.route(path, Route::Stall)
    }

    /// Fails every exchange on `path` with `fault`.
    pub fn fault(self, path: &str, fault: Fault) -> Self {
        self.route(path, Route::Fault(fault))
    }

    /// Answers `path` with a body of `chunks` chunks of `chunk_size` bytes, holding all but the
    /// first back until `gate` is notified, if given.
    pub fn stream(
        self,
        path: &str,
        chunk_size: usize,
        chunks: usize,
        gate: Option<Arc<Notify>>,
    ) -> Self {
        self.route(
            path,
            Route::Stream {
                chunk_size,
                chunks,
                gate,
            },
        )
    }

    /// Enforces TMDB's own limit: at most `per_second` requests per key in any one-second window,
    /// answering more with 429 code 25 (`None`: no limit).
    pub fn rate_limit(mut self, per_second: Option<u32>) -> Self {
        self.cfg.rate_limit = per_second;
        self
    }

    /// Waits `latency` before every answer.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.cfg.latency = latency;
        self
    }

    /// Takes `latency` to open each in-memory connection ([`Sim::dialer`]), as a TCP connect
    /// and TLS handshake would.
    pub fn connect_latency(mut self, latency: Duration) -> Self {
        self.cfg.connect_latency = latency;
        self
    }

    /// Remembers only the latest `n` arrivals (a stand-in serving a benchmark at 50,000 requests
    /// a second stays within bounded memory); by default, all.
    pub fn keep_arrivals(mut self, n: usize) -> Self {
        self.cfg.keep_arrivals = Some(n);
        self
    }

    /// Speaks HTTPS with `tls` (tests of the proxy's upstream TLS).
    pub fn tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Binds `127.0.0.1:0` and starts.
    pub async fn start(self) -> io::Result<Sim> {
        self.start_on(TcpListener::bind("127.0.0.1:0").await?)
    }

    /// Starts on a thread and runtime of its own, so the times it records for arrivals do not
    /// wait behind the proxy's and the clients' tasks (tests and benchmarks that measure windows
    /// at the upstream over real sockets). It serves until the returned [`OwnThread`] drops.
    pub fn start_on_own_thread(self) -> io::Result<OwnThread> {
        let (started, sim) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = started.send(Err(error));
                    return;
                }
            };
            runtime.block_on(async move {
                let _ = started.send(self.start().await);
                let _ = stopped.await;
            });
        });
        let sim = sim
            .recv()
            .map_err(|_| io::Error::other("the stand-in's thread ended"))??;
        Ok(OwnThread { sim, _stop: stop })
    }

    /// Starts on `listener`; serves until the [`Sim`] is dropped.
    pub fn start_on(self, listener: TcpListener) -> io::Result<Sim> {
        let addr = listener.local_addr()?;
        let stand_in = Arc::new(StandIn {
            cfg: self.cfg,
            state: Arc::new(State::default()),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let tls = self.tls.map(tokio_rustls::TlsAcceptor::from);
        let serving = stand_in.clone();
        tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            accept::accept_until(&listener, "tmdb-sim", None, stopped, |stream, _, _| {
                let (stand_in, tls) = (serving.clone(), tls.clone());
                // Counted from the accept, TLS handshake included.
                let open = stand_in.state.opened();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                stand_in.serve(stream).await;
                            }
                        }
                        None => stand_in.serve(stream).await,
                    }
                    drop(open);
                });
            })
            .await;
        });
        Ok(Sim {
            addr,
            stand_in,
            _stop: stop,
        })
    }
}

#[derive(Debug, Default)]
struct State {
    /// The latest arrivals, at most `SimConfig::keep_arrivals` of them.
    arrivals: Mutex<VecDeque<Arrival>>,
    /// Requests received in all, kept or not.
    hits: AtomicUsize,
    /// Per-credential arrival times inside the last second, for `rate_limit`.
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    open: AtomicUsize,
    max_open: AtomicUsize,
    accepted: AtomicUsize,
}

impl State {
    /// Counts a connection as open (and accepted) until the returned guard, or any clone of it,
    /// drops: whichever end closes first closes the connection.
    fn opened(self: &Arc<Self>) -> OpenConnection {
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_open.fetch_max(open, Ordering::SeqCst);
        self.accepted.fetch_add(1, Ordering::SeqCst);
        OpenConnection(Arc::new(Counted {
            state: self.clone(),
            closed: AtomicBool::new(false),
        }))
    }
}

/// An open connection of the stand-in, counted until the first of its clones drops.
#[derive(Clone)]
struct OpenConnection(Arc<Counted>);

struct Counted {
    state: Arc<State>,
    closed: AtomicBool,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if !self.0.closed.swap(true, Ordering::SeqCst) {
            self.0.state.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The proxy's end of an in-memory connection. Dropping it closes the connection at once, as
/// closing a socket does (the stand-in's end may not read again for a while).
struct Dialed {
    io: tokio::io::DuplexStream,
    _open: OpenConnection,
}

impl AsyncRead for Dialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The stand-in's settings and what it has seen, shared by its connections.
#[derive(Debug)]
struct StandIn {
    cfg: SimConfig,
    state: Arc<State>,
}

/// A running stand-in. Dropping it stops the accept loop.
#[derive(Debug)]
pub struct Sim {
    addr: SocketAddr,
    stand_in: Arc<StandIn>,
    _stop: oneshot::Sender<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sim {
    /// A stand-in to configure.
    pub fn builder() -> SimBuilder {
        SimBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` URL of the stand-in.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Opens in-memory connections to this stand-in, as if accepted on its listener (plain HTTP),
    /// each after the builder's `connect_latency`.
    pub fn dialer(&self) -> Dialer {
        let stand_in = self.stand_in.clone();
        Arc::new(move || {
            let stand_in = stand_in.clone();
            Box::pin(async move {
                if !stand_in.cfg.connect_latency.is_zero() {
                    tokio::time::sleep(stand_in.cfg.connect_latency).await;
                }
                let (client, server) = tokio::io::duplex(PIPE_BUFFER);
                let open = stand_in.state.opened();
                let dialed = Dialed {
                    io: client,
                    _open: open.clone(),
                };
                tokio::spawn(async move {
                    stand_in.serve(server).await;
                    drop(open);
                });
                Box::new(dialed) as Box<dyn MemoryIo>
            })
        })
    }

    /// The requests received since the last call (the latest, with `keep_arrivals`), taken out:
    /// a long run measures in slices, in bounded memory.
    pub fn take_arrivals(&self) -> Vec<Arrival> {
        lock(&self.stand_in.state.arrivals).drain(..).collect()
    }

    /// The requests received so far (the latest, with `keep_arrivals`), in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.stand_in.state.arrivals)
            .iter()
            .cloned()
            .collect()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.stand_in.state.hits.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.stand_in.state.open.load(Ordering::SeqCst)
    }

    /// Most connections ever open at once.
    pub fn max_open_connections(&self) -> usize {
        self.stand_in.state.max_open.load(Ordering::SeqCst)
    }

    /// Connections accepted in total.
    pub fn accepted_connections(&self) -> usize {
        self.stand_in.state.accepted.load(Ordering::SeqCst)
    }
}

/// A stand-in on a thread and runtime of its own; dropping this stops that runtime.
#[derive(Debug)]
pub struct OwnThread {
    pub sim: Sim,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::ops::Deref for OwnThread {
    type Target = Sim;

    fn deref(&self) -> &Sim {
        &self.sim
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

// === impl StandIn ===

impl StandIn {
    /// Serves one connection, HTTP/1.1 or HTTP/2.
    async fn serve<IO>(self: Arc<Self>, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let this = self.clone();
        let service = service_fn(move |req| {
            let this = this.clone();
            async move { this.answer(req).await }
        });
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    /// Records the request, then answers it; an `Err` closes the connection unanswered.
    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<SimBody>, io::Error> {
        let now = Instant::now();
        let (parts, body) = req.into_parts();
        let route = self.cfg.routes.get(parts.uri.path());
        if let Some(Route::Fault(Fault::AnswerBeforeBody { read_after })) = route {
            let (read_after, stand_in) = (*read_after, self.clone());
            tokio::spawn(async move {
                tokio::time::sleep(read_after).await;
                // hyper's server ends a body read after its response has gone only when the
                // connection closes: the body is whole once its declared length is in.
                let (mut body, mut whole) = (body, Vec::new());
                while !body.is_end_stream() {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            whole.extend_from_slice(frame.data_ref().map_or(&[][..], |d| d))
                        }
                        _ => break,
                    }
                }
                stand_in.record(now, &parts, Bytes::from(whole));
            });
            return Ok(json_response(StatusCode::OK, "{}"));
        }
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let query = Query::parse(parts.uri.query());
        let credential = self.record(now, &parts, body);

        if !self.cfg.latency.is_zero() {
            tokio::time::sleep(self.cfg.latency).await;
        }
        if let Some(route) = route {
            return route_response(route).await;
        }
        let Some(credential) = credential else {
            return Ok(tmdb_error(ErrorBody::for_code(code::INVALID_API_KEY)));
        };
        if let Some(limited) = self.over_rate_limit(credential, now) {
            return Ok(limited);
        }
        Ok(match builtin(&path, &query) {
            Some(json) => json_response(StatusCode::OK, json),
            None => tmdb_error(ErrorBody::for_code(code::NOT_FOUND)),
        })
    }

    /// Counts and remembers a request whose headers arrived at `now`; returns its credential.
    fn record(&self, now: Instant, parts: &http::request::Parts, body: Bytes) -> Option<String> {
        let query = Query::parse(parts.uri.query());
        let credential = auth::credential(&query, &parts.headers).map(|c| c.as_sent().to_owned());
        self.state.hits.fetch_add(1, Ordering::SeqCst);
        let mut arrivals = lock(&self.state.arrivals);
        if let Some(keep) = self.cfg.keep_arrivals {
            while arrivals.len() >= keep.max(1) {
                arrivals.pop_front();
            }
        }
        arrivals.push_back(Arrival {
            at: now,
            method: parts.method.clone(),
            target: parts.uri.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            credential: credential.clone(),
            headers: parts.headers.clone(),
            body,
        });
        credential
    }

    /// TMDB's own 429 when `credential` is over `rate_limit` in the second before `now`.
    fn over_rate_limit(&self, credential: String, now: Instant) -> Option<Response<SimBody>> {
        let limit = self.cfg.rate_limit?;
        let mut windows = lock(&self.state.windows);
        // Keys seen once and not since are forgotten, so invented keys cannot grow the map.
        if windows.len() >= MAX_TRACKED_KEYS {
            windows.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|&t| now - t < Duration::from_secs(1))
            });
        }
        let window = windows.entry(credential).or_default();
        while window
            .front()
            .is_some_and(|&t| now - t >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() < limit as usize {
            window.push_back(now);
            return None;
        }
        let count = window.len() as u64 + 1;
        let mut response = tmdb_error(ErrorBody::rate_limited(count, u64::from(limit)));
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        Some(response)
    }
}

/// TMDB-like answers for a few endpoints a demo or a client library's smoke test calls.
fn builtin(path: &str, query: &Query<'_>) -> Option<String> {
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
            let term = query.values("query").next().unwrap_or_default();
            let term = serde_json::to_string(term).unwrap_or_else(|_| "\"\"".into());
            Some(format!(
                r#"{{"page":1,"results":[{{"id":550,"media_type":"{kind}","title":{term}}}],"total_pages":1,"total_results":1}}"#
            ))
        }
        _ => None,
    }
}

async fn route_response(route: &Route) -> Result<Response<SimBody>, io::Error> {
    let response = match route {
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
        Route::Fault(Fault::Close) => {
            return Err(io::Error::other("closing without an answer"));
        }
        // Answered in `StandIn::answer`, before the body is read.
        Route::Fault(Fault::AnswerBeforeBody { .. }) => json_response(StatusCode::OK, "{}"),
        Route::Fault(Fault::BreakBody { length }) => {
            let mut response = Response::new(SimBody::Broken {
                data: Some(Bytes::from_static(br#"{"id":1,"#)),
                flushed: false,
            });
            let headers = response.headers_mut();
            headers.insert(
                "content-type",
                HeaderValue::from_static(status::CONTENT_TYPE),
            );
            headers.insert("content-length", HeaderValue::from(*length));
            response
        }
    };
    Ok(response)
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
    /// These bytes, then an error: the body breaks. `flushed` notes the one `Pending` between
    /// the two, which lets hyper write the headers and bytes out before the break closes the
    /// connection.
    Broken {
        data: Option<Bytes>,
        flushed: bool,
    },
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = io::Error;

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            // A fixed answer goes with its Content-Length, as TMDB's do.
            Self::Full(data) => {
                http_body::SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Self::Channel(_) | Self::Broken { .. } => http_body::SizeHint::default(),
        }
    }

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Channel(rx) => rx.poll_recv(cx).map(|c| c.map(|d| Ok(Frame::data(d)))),
            Self::Broken { data, flushed } => match (data.take(), *flushed) {
                (Some(d), _) => Poll::Ready(Some(Ok(Frame::data(d)))),
                (None, false) => {
                    *flushed = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                (None, true) => Poll::Ready(Some(Err(io::Error::other("the body breaks here")))),
            },
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

#[cfg(test)]
mod bounded {
    use super::*;

    #[tokio::test]
    async fn a_stand_in_keeping_few_arrivals_still_counts_every_hit() {
        let sim = Sim::builder().keep_arrivals(3).start().await.unwrap();
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::Empty<Bytes>>();
        for id in 0..5 {
            let uri = format!("{}/3/movie/{id}?api_key=K", sim.url());
            let response = client.request(Request::get(uri).body(Default::default()).unwrap());
            assert_eq!(response.await.unwrap().status(), 200);
        }
        assert_eq!(sim.hits(), 5);
        let kept: Vec<String> = sim.arrivals().into_iter().map(|a| a.path).collect();
        assert_eq!(kept, ["/3/movie/2", "/3/movie/3", "/3/movie/4"]);
    }
}
