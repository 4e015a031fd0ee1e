//! Every failure a client sees is a TMDB status body: one test per row of the mapping, against
//! upstreams that really refuse, reset, stall, send HTML or garbage, or send TMDB's own JSON.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;
use tmdb_proxy::sim::{Fault, Sim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const JSON: &str = "application/json;charset=utf-8";

/// The exact body the proxy must write for `code`.
fn tmdb_body(code: u16) -> String {
    let status = tmdb_proxy::tmdb::status::lookup(code).unwrap();
    format!(
        r#"{{"success":false,"status_code":{code},"status_message":"{}"}}"#,
        status.message
    )
}

fn assert_tmdb(reply: &Reply, http: u16, code: u16) {
    assert_eq!(reply.status.as_u16(), http, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some(JSON));
    assert_eq!(reply.text(), tmdb_body(code));
}

/// A stand-in answering `/3/x` with `status`, `content-type` and `body`.
async fn answering(status: u16, content_type: &str, body: &'static str) -> Sim {
    sim_with(Sim::builder().respond("/3/x", status, &[("content-type", content_type)], body)).await
}

async fn through_proxy(status: u16, content_type: &str, body: &'static str) -> Reply {
    let sim = answering(status, content_type, body).await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let reply = get(&http1_client(), &proxy.url("/3/x?api_key=ERR")).await;
    assert_eq!(sim.hits(), 1);
    reply
}

const HTML: &str =
    "<html><head><title>502 Bad Gateway</title></head><body>cloudfront</body></html>";

#[tokio::test]
async fn non_tmdb_error_bodies_become_tmdb_bodies() {
    // (upstream status, content type, body) -> (client status, TMDB code)
    let rows: [(u16, &str, &'static str, u16, u16); 14] = [
        (500, "text/html", HTML, 500, 11),
        (500, "text/plain", "oops", 500, 11),
        (500, JSON, "", 500, 11),
        (500, JSON, r#"{"status_code":"#, 500, 11),
        (502, "text/html", HTML, 502, 43),
        (504, "text/plain", "", 504, 24),
        (503, "text/html", "<h1>Service Unavailable</h1>", 503, 9),
        (
            503,
            "text/html",
            "<h1>Down for scheduled Maintenance</h1>",
            503,
            46,
        ),
        (401, "text/html", HTML, 401, 7),
        (404, "text/html", "<h1>Not Found</h1>", 404, 34),
        (405, "text/plain", "Method Not Allowed", 405, 42),
        (406, "text/plain", "", 406, 19),
        (418, "text/plain", "teapot", 400, 47),
        (507, "text/html", HTML, 500, 11),
    ];
    for (status, content_type, body, http, code) in rows {
        let reply = through_proxy(status, content_type, body).await;
        assert_tmdb(&reply, http, code);
    }
}

#[tokio::test]
async fn upstream_429_with_any_body_is_429_code_25_with_retry_after() {
    let sim = answering(429, "text/html", HTML).await;
    let proxy = spawn_proxy("[limit]\nrequests_per_second = 40\n", &sim.url()).await;
    let reply = get(&http1_client(), &proxy.url("/3/x?api_key=HTML429")).await;
    assert_code_25(&reply, 40);
    // No Retry-After from the upstream: the pause it imposes is 1 s.
    assert_eq!(reply.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn tmdb_json_bodies_pass_through_byte_identical() {
    let bodies: [(u16, &'static str); 6] = [
        (
            404,
            r#"{"success":false,"status_code":34,"status_message":"The resource you requested could not be found."}"#,
        ),
        (
            401,
            r#"{"status_message":"Invalid API key: You must be granted a valid key.","success":false,"status_code":7}"#,
        ),
        (
            401,
            r#"{"status_code":7,"status_message":"Invalid API key: You must be granted a valid key."}"#,
        ),
        (
            401,
            r#"{"success":false,"failure":true,"status_code":36,"status_message":"This token hasn't been granted write permission by the user."}"#,
        ),
        (
            422,
            r#"{"errors":["page must be less than or equal to 500"]}"#,
        ),
        (
            500,
            r#"{ "status_code" : 11 , "status_message" : "Internal error: Something went wrong, contact TMDB." }"#,
        ),
    ];
    for (status, body) in bodies {
        let reply = through_proxy(status, JSON, body).await;
        assert_eq!(reply.status.as_u16(), status);
        assert_eq!(reply.text(), body);
    }
}

#[tokio::test]
async fn success_codes_pass_through_unchanged() {
    for (status, body) in [
        (
            201,
            r#"{"success":true,"status_code":12,"status_message":"The item/record was updated successfully."}"#,
        ),
        (
            200,
            r#"{"success":true,"status_code":13,"status_message":"The item/record was deleted successfully."}"#,
        ),
        (
            200,
            r#"{"success":true,"status_code":1,"status_message":"Success."}"#,
        ),
    ] {
        let reply = through_proxy(status, JSON, body).await;
        assert_eq!(reply.status.as_u16(), status);
        assert_eq!(reply.text(), body);
    }
}

#[tokio::test]
async fn gzipped_tmdb_error_passes_through_still_compressed() {
    use std::io::Write;
    let json = r#"{"errors":["query must be provided"]}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(json.as_bytes()).unwrap();
    let compressed = Bytes::from(gz.finish().unwrap());
    let sim = sim_with(Sim::builder().respond(
        "/3/x",
        422,
        &[("content-type", JSON), ("content-encoding", "gzip")],
        compressed.clone(),
    ))
    .await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let reply = get_with(
        &http1_client(),
        &proxy.url("/3/x?api_key=GZ"),
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(reply.status, 422);
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(reply.body, compressed);
}

/// A raw TCP upstream: each connection's request head is read, then `respond` runs.
async fn raw_upstream<F, Fut>(respond: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let respond = std::sync::Arc::new(respond);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let respond = respond.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                respond(stream).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn reset_before_response_is_502_code_43() {
    let url = raw_upstream(|stream| async move {
        // Linger 0: closing sends RST instead of FIN.
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    let proxy = spawn_proxy("", &url).await;
    assert_tmdb(
        &get(&http1_client(), &proxy.url("/3/movie/1?api_key=RST")).await,
        502,
        43,
    );
}

#[tokio::test]
async fn a_connection_closed_without_an_answer_is_502_code_43() {
    let sim = sim_with(Sim::builder().fault("/3/movie/1", Fault::Close)).await;
    let proxy = spawn_proxy("", &sim.url()).await;
    assert_tmdb(
        &get(&http1_client(), &proxy.url("/3/movie/1?api_key=CLOSED")).await,
        502,
        43,
    );
    assert_eq!(sim.hits(), 1);
}

#[tokio::test]
async fn a_reply_that_is_not_http_is_502_code_43() {
    let url = raw_upstream(|mut stream| async move {
        let _ = stream
            .write_all(b"SSH-2.0-OpenSSH_9.6\r\nProtocol mismatch.\r\n")
            .await;
        let _ = stream.shutdown().await;
    })
    .await;
    let proxy = spawn_proxy("", &url).await;
    assert_tmdb(
        &get(&http1_client(), &proxy.url("/3/movie/1?api_key=GARBAGE")).await,
        502,
        43,
    );
}

#[tokio::test]
async fn connect_beyond_connect_timeout_is_504_code_24() {
    // TCP connects, but the TLS handshake never completes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let proxy = spawn_proxy(
        "[upstream]\nconnect_timeout = \"300ms\"\n",
        &format!("https://127.0.0.1:{port}"),
    )
    .await;
    assert_tmdb(
        &get(&http1_client(), &proxy.url("/3/movie/1?api_key=HANG")).await,
        504,
        24,
    );
}

#[tokio::test]
async fn a_large_body_broken_after_its_headers_closes_the_connection_without_a_second_response() {
    // Over 256 KiB declared: the headers are passed on at once and the body streams.
    let sim =
        sim_with(Sim::builder().fault("/3/movie/1", Fault::BreakBody { length: 1_000_000 })).await;
    let url = sim.url();
    let proxy = spawn_proxy("", &url).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /3/movie/1?api_key=BROKEN HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "the proxy closes the client connection");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert_eq!(
        text.matches("HTTP/1.1").count(),
        1,
        "no second response: {text}"
    );
    assert!(!text.contains("status_code"), "{text}");
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .proxy
            .broken_upstream_bodies()
            == 1)
        .await,
        "the break is counted"
    );
}

#[tokio::test]
async fn a_short_body_broken_before_anything_was_passed_on_is_502_code_43() {
    // A body of a declared 100,000 bytes is read whole before the answer goes out, so its break
    // can still be answered with a TMDB body.
    let sim =
        sim_with(Sim::builder().fault("/3/movie/1", Fault::BreakBody { length: 100_000 })).await;
    let proxy = spawn_proxy("", &sim.url()).await;
    assert_tmdb(
        &get(&http1_client(), &proxy.url("/3/movie/1?api_key=BROKEN")).await,
        502,
        43,
    );
    assert_eq!(proxy.proxy.broken_upstream_bodies(), 1);
}

#[tokio::test]
async fn quota_savers_answer_locally_without_spending() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 1\nmode = \"reject\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let cases = [
        ("/3/discover/movie?api_key=Q&page=0", 22),
        ("/3/discover/movie?api_key=Q&page=501", 22),
        ("/3/discover/movie?api_key=Q&page=two", 22),
        (
            "/3/discover/movie?api_key=Q&primary_release_date.gte=2024-1-1",
            23,
        ),
        ("/3/tv/changes?api_key=Q&start_date=01/02/2024", 23),
        (
            "/3/movie/550?api_key=Q&append_to_response=a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u",
            27,
        ),
    ];
    for (path, code) in cases {
        assert_tmdb(&get(&client, &proxy.url(path)).await, 400, code);
    }
    assert_eq!(sim.hits(), 0);
    // No token was spent: the key's single token is still there.
    assert_eq!(
        get(&client, &proxy.url("/3/movie/550?api_key=Q&page=2"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn quota_savers_can_be_switched_off() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[quota_savers]\npage = false\ndates = false\nappend_to_response = false\n",
        &sim.url(),
    )
    .await;
    let reply = get(
        &http1_client(),
        &proxy.url("/3/movie/1?api_key=Q&page=0&release_date=x"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(sim.hits(), 1);
}

#[tokio::test]
async fn paths_outside_the_api_are_404_code_34() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let client = http1_client();
    for path in [
        "/",
        "/admin?api_key=P",
        "/5/movie/1?api_key=P",
        "/3/../internal?api_key=P",
        "/3/movie%2f..%2f..%2finternal?api_key=P",
        "/3/movie%5c550?api_key=P",
        "/3/movie;jsessionid=1/550?api_key=P",
    ] {
        assert_tmdb(&get(&client, &proxy.url(path)).await, 404, 34);
    }
    assert_eq!(sim.hits(), 0);
}

#[tokio::test]
async fn connect_method_is_405_code_42() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"CONNECT api.themoviedb.org:443 HTTP/1.1\r\nHost: api.themoviedb.org:443\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.ends_with(&tmdb_body(42)), "{text}");
    assert_eq!(sim.hits(), 0);
}

#[tokio::test]
async fn oversized_headers_get_431_code_47() {
    let sim = sim().await;
    let proxy = spawn_proxy("[server]\nmax_header_bytes = \"4KiB\"\n", &sim.url()).await;
    let big = "x".repeat(5000);
    let reply = get_with(
        &http1_client(),
        &proxy.url("/3/movie/1?api_key=K"),
        &[("x-padding", big.as_str())],
    )
    .await;
    assert_eq!(reply.status, 431);
    assert_eq!(reply.json()["status_code"], 47);
    assert_eq!(sim.hits(), 0);
}

/// A request body of `left` chunks of 512 bytes with no declared length: sent chunked.
struct Chunks {
    left: usize,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            b'y';
            512
        ])))))
    }
}

#[tokio::test]
async fn oversized_request_bodies_get_413_code_47_declared_or_chunked() {
    use http_body_util::Full;
    let sim = sim().await;
    let proxy = spawn_proxy("[server]\nmax_request_body = \"1KiB\"\n", &sim.url()).await;
    let url = proxy.url("/3/movie/550/rating?api_key=K&session_id=S");
    // Declared: refused from its Content-Length.
    let declared =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Full<Bytes>>();
    let req = http::Request::post(&url)
        .body(Full::new(Bytes::from(vec![b'x'; 2048])))
        .unwrap();
    assert_eq!(declared.request(req).await.unwrap().status(), 413);
    // Chunked: refused once more than the limit has arrived.
    let chunked = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Chunks>();
    let req = http::Request::post(&url).body(Chunks { left: 4 }).unwrap();
    let response = chunked.request(req).await.unwrap();
    assert_eq!(response.status(), 413);
    // The rest of the body is never read: the client must not reuse the connection.
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains(r#""status_code":47"#));
    // Within the limit, chunked or not, it is forwarded.
    let req = http::Request::post(&url).body(Chunks { left: 2 }).unwrap();
    assert_eq!(chunked.request(req).await.unwrap().status(), 404);
    assert_eq!(sim.hits(), 1);
    assert_eq!(sim.arrivals()[0].body.len(), 1024);
}
