//! Shared helpers: start the proxy and a TMDB stand-in on 127.0.0.1:0 and talk HTTP to them, or
//! call the proxy in-process ([`InProcess`]) for tests on paused time.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tmdb_proxy::server::Server;
use tmdb_proxy::sim::{OwnThread, Sim, SimBuilder};
use tmdb_proxy::{Config, Proxy};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod redis;

/// A running proxy. Dropping it shuts the server down.
pub struct Running {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

impl Running {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Signals shutdown and waits for the server to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Parses `toml` with `base_url` pointed at `upstream` (environment overrides injected, never
/// read from the process). The response cache is off unless `toml` has a `[cache]` section:
/// tests of everything else count the requests that reach the stand-in.
pub fn config(toml: &str, upstream: &str) -> Config {
    let mut env = HashMap::new();
    env.insert(
        "TMDB_PROXY__UPSTREAM__BASE_URL".to_owned(),
        upstream.to_owned(),
    );
    if !toml.contains("[cache]") {
        env.insert("TMDB_PROXY__CACHE__ENABLED".to_owned(), "false".to_owned());
    }
    Config::from_toml_with_env(toml, Some(env)).expect("test config is valid")
}

/// Parses `toml` (with `base_url` pointed at `upstream`) and starts the proxy on 127.0.0.1:0.
pub async fn spawn_proxy(toml: &str, upstream: &str) -> Running {
    spawn_with(config(toml, upstream)).await
}

pub async fn spawn_with(cfg: Config) -> Running {
    let listener = tmdb_proxy::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::new(&cfg).expect("proxy builds");
    let server = Server::new(&cfg.server).expect("server builds");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(listener, proxy.clone(), async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        proxy,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A stand-in with no TMDB limit of its own and no latency.
pub async fn sim() -> Sim {
    Sim::builder().start().await.unwrap()
}

/// Starts the stand-in `builder` describes.
pub async fn sim_with(builder: SimBuilder) -> Sim {
    builder.start().await.unwrap()
}

/// Starts the stand-in `builder` describes on a thread and runtime of its own (see
/// [`SimBuilder::start_on_own_thread`]).
pub fn sim_on_own_thread(builder: SimBuilder) -> OwnThread {
    builder.start_on_own_thread().expect("the stand-in starts")
}

/// The address requests appear to come from when the proxy is called in-process.
pub const IN_PROCESS_CLIENT: &str = "127.0.0.1:40000";

/// The proxy called in-process ([`Proxy::handle`], no client socket), reaching the stand-in
/// through an in-memory pipe: no socket anywhere, so on paused time the clock moves only when
/// every task waits on a timer, and times can be asserted exactly.
pub struct InProcess {
    pub proxy: Proxy,
    pub sim: Sim,
}

impl InProcess {
    /// The proxy configured by `toml`, in front of `sim`.
    pub fn new(toml: &str, sim: Sim) -> Self {
        let cfg = config(toml, &sim.url());
        let proxy = Proxy::in_memory(&cfg, sim.dialer()).expect("proxy builds");
        Self { proxy, sim }
    }

    /// Sends `req` to the proxy and reads the answer whole.
    pub async fn call(&self, req: Request<Empty<Bytes>>) -> Reply {
        call(&self.proxy, req).await
    }

    /// GET `path_and_query`.
    pub async fn get(&self, path_and_query: &str) -> Reply {
        self.get_with(path_and_query, &[]).await
    }

    /// GET `path_and_query` with extra headers.
    pub async fn get_with(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::get(path_and_query);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.call(req.body(Empty::new()).unwrap()).await
    }

    /// GET `path_and_query` in a task of its own: a client that can be left waiting or dropped.
    pub fn spawn_get(&self, path_and_query: &str) -> JoinHandle<Reply> {
        let (proxy, req) = (
            self.proxy.clone(),
            Request::get(path_and_query).body(Empty::new()).unwrap(),
        );
        tokio::spawn(async move { call(&proxy, req).await })
    }

    /// The paths of the requests that reached the stand-in, in order.
    pub fn arrived_paths(&self) -> Vec<String> {
        self.sim.arrivals().iter().map(|a| a.path.clone()).collect()
    }

    /// Arrival times at the stand-in of requests carrying `credential`, in order.
    pub fn arrivals_of(&self, credential: &str) -> Vec<tokio::time::Instant> {
        self.sim
            .arrivals()
            .iter()
            .filter(|a| a.credential.as_deref() == Some(credential))
            .map(|a| a.at)
            .collect()
    }
}

/// Calls `proxy` in-process with `req` and reads the answer whole.
pub async fn call(proxy: &Proxy, req: Request<Empty<Bytes>>) -> Reply {
    let client = IN_PROCESS_CLIENT.parse().unwrap();
    let (parts, body) = proxy.handle(req, client).await.into_parts();
    let body = body.collect().await.expect("body arrives").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

/// An HTTP/1.1 client with a pool large enough for hundreds of concurrent requests.
pub fn http1_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<binary>")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// GET `url` with extra headers.
pub async fn get_with(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .expect("proxy answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body arrives").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &TestClient, url: &str) -> Reply {
    get_with(client, url, &[]).await
}

/// The exact code-25 body for `limit`, whatever the count.
pub fn assert_code_25(reply: &Reply, limit: u32) {
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.text()
    );
    assert_eq!(
        reply.header("content-type"),
        Some("application/json;charset=utf-8")
    );
    let json = reply.json();
    assert_eq!(json["success"], false);
    assert_eq!(json["status_code"], 25);
    let count = json["status_message"]
        .as_str()
        .and_then(|m| m.strip_prefix("Your request count ("))
        .and_then(|m| m.split(')').next())
        .and_then(|n| n.parse::<u32>().ok())
        .expect("message has the request count");
    assert!(count > limit);
    assert_eq!(
        reply.text(),
        format!(
            r#"{{"success":false,"status_code":25,"status_message":"Your request count ({count}) is over the allowed limit of ({limit})."}}"#
        )
    );
    let retry_after: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After is whole seconds");
    assert!(retry_after >= 1);
}

/// Polls `check` every 20 ms until it holds or `deadline` passes.
pub async fn eventually(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// A TMDB v4-style read token: a JWT whose payload names `aud`.
pub fn jwt_with_aud(aud: &str) -> String {
    use base64::Engine as _;
    let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        enc.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        enc.encode(format!(
            r#"{{"aud":"{aud}","sub":"5f00","scopes":["api_read"],"version":1}}"#
        )),
        enc.encode("signature")
    )
}

/// One HTTP/1.1 keep-alive connection, kept open for the whole test: every request goes over it.
pub struct OneConnection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl OneConnection {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    /// GET /3/movie/1 for `key`; the status. Panics if the connection was closed.
    pub async fn status_for_key(&mut self, key: &str) -> u16 {
        let req = Request::get(format!("/3/movie/1?api_key={key}"))
            .header("host", "localhost")
            .body(Empty::new())
            .unwrap();
        self.sender
            .ready()
            .await
            .expect("keep-alive connection still open");
        let response = self
            .sender
            .send_request(req)
            .await
            .expect("keep-alive connection still open");
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        status
    }
}
