//! Forwarding through the proxy, end to end over real sockets: what the upstream sees and what
//! the client gets back.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use support::*;
use tmdb_proxy::sim::Sim;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

#[tokio::test]
async fn keyed_request_is_forwarded_and_response_comes_back_intact() {
    let body = r#"{"id":550,"title":"Fight Club","tagline":"Mischief. Mayhem. Soap."}"#;
    let sim = sim_with(Sim::builder().respond(
        "/3/movie/550",
        200,
        &[
            ("content-type", "application/json;charset=utf-8"),
            ("cache-control", "public, max-age=21384"),
            ("etag", "W/\"abc\""),
            ("x-custom-upstream", "kept"),
        ],
        body,
    ))
    .await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let client = http1_client();

    let reply = get_with(
        &client,
        &proxy.url("/3/movie/550?api_key=KEY1&&language=en-US&include_image_language=null"),
        &[
            ("content-type", "application/json"),
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "must not pass"),
            ("keep-alive", "timeout=5"),
            ("accept-encoding", "gzip"),
        ],
    )
    .await;

    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), body);
    assert_eq!(reply.header("cache-control"), Some("public, max-age=21384"));
    assert_eq!(reply.header("etag"), Some("W/\"abc\""));
    assert_eq!(reply.header("x-custom-upstream"), Some("kept"));
    assert_eq!(
        reply.header("content-type"),
        Some("application/json;charset=utf-8")
    );

    let arrivals = sim.arrivals();
    assert_eq!(arrivals.len(), 1);
    let seen = &arrivals[0];
    assert_eq!(seen.path, "/3/movie/550");
    assert_eq!(
        seen.query.as_deref(),
        Some("api_key=KEY1&&language=en-US&include_image_language=null")
    );
    assert_eq!(seen.credential.as_deref(), Some("KEY1"));
    assert_eq!(seen.headers["host"], sim.addr().to_string().as_str());
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["accept-encoding"], "gzip");
    assert!(!seen.headers.contains_key("x-hop"));
    assert!(!seen.headers.contains_key("keep-alive"));
}

#[tokio::test]
async fn request_bodies_are_forwarded() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let body = r#"{"value":8.5}"#;
    let req = Request::post(proxy.url("/3/movie/550/rating?api_key=K&session_id=S"))
        .header("content-type", "application/json;charset=utf-8")
        .body(http_body_util::Full::new(Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 404, "the stand-in has no rating route");
    let seen = &sim.arrivals()[0];
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.headers["content-length"],
        body.len().to_string().as_str()
    );
}

#[tokio::test]
async fn compressed_bodies_pass_through_untouched() {
    let gz = Bytes::from_static(&[0x1f, 0x8b, 0x08, 0x00, 0xde, 0xad, 0xbe, 0xef, 0x00, 0xff]);
    let sim = sim_with(Sim::builder().respond(
        "/3/configuration",
        200,
        &[
            ("content-type", "application/json;charset=utf-8"),
            ("content-encoding", "gzip"),
        ],
        gz.clone(),
    ))
    .await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let reply = get_with(
        &http1_client(),
        &proxy.url("/3/configuration?api_key=K"),
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(reply.body, gz);
}

#[tokio::test]
async fn http2_cleartext_clients_are_served() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let reply = get(&h2_client(), &proxy.url("/3/movie/603?api_key=K")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["id"], 603);
    // Upstream is always spoken to over HTTP/1.1, whatever the client used.
    assert_eq!(sim.hits(), 1);
}

#[tokio::test]
async fn connection_close_clients_are_served() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /3/movie/1?api_key=K HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("proxy closes the connection after answering")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""id":1"#), "{text}");
}

#[tokio::test]
async fn default_key_is_injected_when_the_request_has_none() {
    let sim = sim().await;
    let proxy = spawn_proxy("[keys]\ndefault_api_key = \"DEFAULTKEY0123\"\n", &sim.url()).await;
    let reply = get(&http1_client(), &proxy.url("/3/movie/550?language=de-DE")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = &sim.arrivals()[0];
    assert_eq!(
        seen.query.as_deref(),
        Some("language=de-DE&api_key=DEFAULTKEY0123")
    );
    // The key the proxy holds is never echoed back to the client.
    assert!(!reply.text().contains("DEFAULTKEY0123"));
    assert!(!format!("{:?}", reply.headers).contains("DEFAULTKEY0123"));
}

#[tokio::test]
async fn request_without_any_key_gets_401_code_7() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let reply = get(&http1_client(), &proxy.url("/3/movie/550?language=en-US")).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json;charset=utf-8")
    );
    assert_eq!(
        reply.text(),
        r#"{"success":false,"status_code":7,"status_message":"Invalid API key: You must be granted a valid key."}"#
    );
    assert_eq!(sim.hits(), 0);
}

#[tokio::test]
async fn only_the_configured_upstream_is_ever_contacted() {
    let sim = sim().await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET http://example.com/3/movie/1?api_key=K HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains(r#""status_code":47"#), "{text}");
    assert_eq!(sim.hits(), 0);
}

#[tokio::test]
async fn upstream_never_sees_more_than_max_connections() {
    let sim = sim_with(Sim::builder().latency(Duration::from_millis(30))).await;
    let proxy = spawn_proxy(
        "[upstream]\nmax_connections = 4\n[limit]\nrequests_per_second = 1000\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let mut tasks = Vec::new();
    for i in 0..80 {
        let (client, url) = (
            client.clone(),
            proxy.url(&format!("/3/movie/{i}?api_key=K{}", i % 7)),
        );
        tasks.push(tokio::spawn(async move { get(&client, &url).await.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(sim.hits(), 80);
    assert!(
        sim.max_open_connections() <= 4,
        "{}",
        sim.max_open_connections()
    );
    // The pool is reused rather than reconnecting per request.
    assert!(
        sim.accepted_connections() <= 8,
        "{}",
        sim.accepted_connections()
    );
}

/// Four serving threads, each with a socket of its own, share a cap of two connections: a
/// connection the kernel queued on any of them is served once a slot frees, whichever thread
/// the slot was freed on.
#[tokio::test]
async fn every_serving_thread_gets_slots_under_a_shared_connection_cap() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[server]\nworkers = 4\nmax_connections = 2\n[limit]\nrequests_per_second = 1000\n",
        &sim.url(),
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..24 {
        let addr = proxy.addr;
        clients.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "GET /3/movie/{i}?api_key=K HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            String::from_utf8_lossy(&raw).into_owned()
        }));
    }
    for client in clients {
        let text = tokio::time::timeout(Duration::from_secs(20), client)
            .await
            .expect("every connection is served in turn")
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    assert_eq!(sim.hits(), 24);
}

#[tokio::test]
async fn large_response_streams_without_being_held_whole() {
    let gate = Arc::new(Notify::new());
    // 128 chunks of 64 KiB: 8 MiB.
    let sim = sim_with(Sim::builder().stream("/3/big", 64 * 1024, 128, Some(gate.clone()))).await;
    let proxy = spawn_proxy("", &sim.url()).await;
    let client = http1_client();
    let req = Request::get(proxy.url("/3/big?api_key=K"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("headers arrive before the body is complete")
        .unwrap();
    assert_eq!(
        response.headers()["content-length"],
        (64 * 1024 * 128).to_string().as_str()
    );
    let mut body = response.into_body();
    // The first chunk reaches the client while the upstream still holds back the rest: the
    // proxy cannot be buffering the whole body.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk streams through")
        .unwrap()
        .unwrap();
    let mut received = first.into_data().map(|d| d.len()).unwrap_or(0);
    assert!(received > 0);
    gate.notify_one();
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(received, 64 * 1024 * 128);
}

#[tokio::test]
async fn cors_preflight_is_answered_locally_and_limits_are_exposed() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[limit]\nrequests_per_second = 1\nmode = \"reject\"\n",
        &sim.url(),
    )
    .await;
    let client = http1_client();
    let preflight = client
        .request(
            Request::options(proxy.url("/3/movie/550"))
                .header("origin", "https://app.example")
                .header("access-control-request-method", "GET")
                .header("access-control-request-headers", "authorization")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        preflight.headers()["access-control-allow-headers"],
        "authorization"
    );
    assert_eq!(sim.hits(), 0, "a preflight never reaches the upstream");

    let ok = get(&client, &proxy.url("/3/movie/1?api_key=CORS")).await;
    let limited = get(&client, &proxy.url("/3/movie/1?api_key=CORS")).await;
    for reply in [&ok, &limited] {
        assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
        assert!(
            reply
                .header("access-control-expose-headers")
                .unwrap()
                .contains("retry-after")
        );
    }
    assert_eq!(limited.status, 429);
}

#[tokio::test]
async fn idle_client_connections_are_closed_but_busy_ones_are_not() {
    let sim = sim_with(Sim::builder().latency(Duration::from_millis(700))).await;
    let proxy = spawn_proxy("[server]\nidle_timeout = \"300ms\"\n", &sim.url()).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // A request slower than the idle timeout is still answered on its connection.
    stream
        .write_all(b"GET /3/movie/1?api_key=IDLE HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Then, idle, the connection is closed by the proxy.
    let rest = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut Vec::new()))
        .await
        .expect("the idle connection is closed");
    assert!(rest.is_ok());
}

#[tokio::test]
async fn requests_reach_the_upstream_in_origin_form_with_its_host() {
    let harness = InProcess::new("", sim().await);
    assert_eq!(
        harness.get("/3/movie/550?api_key=K&page=1").await.status,
        200
    );
    let seen = &harness.sim.arrivals()[0];
    assert_eq!(seen.target, "/3/movie/550?api_key=K&page=1");
    assert_eq!(
        seen.headers["host"],
        harness.sim.addr().to_string().as_str()
    );
}

#[tokio::test]
async fn ambiguous_credentials_are_refused_and_nothing_is_forwarded() {
    let harness = InProcess::new("", sim().await);
    let token = jwt_with_aud("REALKEY");
    let bearer = format!("Bearer {token}");
    // A decoy key charged while the real token would be honoured.
    let decoy = harness
        .get_with("/3/movie/1?api_key=DECOY", &[("authorization", &bearer)])
        .await;
    assert_eq!(
        (decoy.status.as_u16(), decoy.json()["status_code"].as_u64()),
        (400, Some(47))
    );
    // A key hidden behind `;`, and two Authorization headers.
    let hidden = harness.get("/3/movie/1?x=1;api_key=REALKEY").await;
    assert_eq!(hidden.status, 400);
    let twice = harness
        .get_with(
            "/3/movie/1",
            &[
                ("authorization", "Bearer one"),
                ("authorization", "Bearer two"),
            ],
        )
        .await;
    assert_eq!(twice.status, 400);
    assert_eq!(harness.sim.hits(), 0);
    // The same account as key and token is not ambiguous.
    let agreeing = harness
        .get_with("/3/movie/1?api_key=REALKEY", &[("authorization", &bearer)])
        .await;
    assert_eq!(agreeing.status, 200);
}

#[tokio::test]
async fn an_injected_key_never_comes_back_in_a_redirect() {
    let sim = sim_with(Sim::builder().respond(
        "/3/moved",
        301,
        &[
            (
                "location",
                "/3/movie/550?language=de&api_key=DEFAULTKEY0123",
            ),
            (
                "content-location",
                "http://example.test/3/x?api_key=DEFAULTKEY0123",
            ),
        ],
        "",
    ))
    .await;
    let harness = InProcess::new("[keys]\ndefault_api_key = \"DEFAULTKEY0123\"\n", sim);
    let reply = harness.get("/3/moved?language=de").await;
    assert_eq!(reply.status, 301);
    assert_eq!(reply.header("location"), Some("/3/movie/550?language=de"));
    assert_eq!(
        reply.header("content-location"),
        Some("http://example.test/3/x")
    );
    assert!(!format!("{:?}", reply.headers).contains("DEFAULTKEY0123"));
    // The upstream did get the key.
    assert_eq!(
        harness.sim.arrivals()[0].credential.as_deref(),
        Some("DEFAULTKEY0123")
    );
}

/// A GET answered with headers whose body is left unread for as long as the test holds it.
async fn unread(
    proxy: &tmdb_proxy::Proxy,
    path: &str,
) -> http::Response<tmdb_proxy::proxy::ProxyBody> {
    let req = Request::get(path).body(Empty::<Bytes>::new()).unwrap();
    proxy.handle(req, IN_PROCESS_CLIENT.parse().unwrap()).await
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_does_not_hold_the_upstream_connection() {
    // 1 MiB: streamed, but within the 8 MiB buffer.
    let sim = sim_with(Sim::builder().stream("/3/big", 64 * 1024, 16, None)).await;
    let harness = InProcess::new(
        "[upstream]\nmax_connections = 1\nrequest_timeout = \"1h\"\n",
        sim,
    );
    let start = tokio::time::Instant::now();
    let held = unread(&harness.proxy, "/3/big?api_key=SLOW").await;
    assert_eq!(held.status(), 200);
    // The whole body is read into memory, and the one upstream connection is free again at once.
    for id in 1..=3 {
        let reply = harness.get(&format!("/3/movie/{id}?api_key=OTHER")).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(harness.sim.max_open_connections(), 1);
    // The slow client still gets every byte when it reads.
    let body = held.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 1 << 20);
}

#[tokio::test(start_paused = true)]
async fn a_body_larger_than_the_buffer_is_cut_when_its_client_stops_reading() {
    let sim = sim_with(Sim::builder().stream("/3/big", 64 * 1024, 16, None)).await;
    let harness = InProcess::new(
        "[upstream]\nmax_connections = 1\nrequest_timeout = \"1h\"\nmax_buffered_body = \"64KiB\"\n",
        sim,
    );
    let start = tokio::time::Instant::now();
    let held = unread(&harness.proxy, "/3/big?api_key=SLOW").await;
    assert_eq!(held.status(), 200);
    // The buffer is full and the client takes nothing: after 5 s the upstream connection is
    // closed, and the request waiting for it goes.
    let other = harness.get("/3/movie/1?api_key=OTHER").await;
    assert_eq!(other.status, 200);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    // The slow client's response ends with an error after what was buffered.
    let mut body = held.into_body();
    let mut received = 0;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
            Some(Err(_)) => break,
            None => panic!("the body should end with an error, not complete"),
        }
    }
    // What the buffer held: whole chunks, never more than its 64 KiB.
    assert!(received > 0 && received <= 64 * 1024, "{received}");
}

#[tokio::test(start_paused = true)]
async fn a_client_reading_steadily_is_never_cut() {
    // 12 MiB through a 1 MiB buffer, read at 640 KiB/s (64 KiB every 100 ms).
    let sim = sim_with(Sim::builder().stream("/3/big", 64 * 1024, 192, None)).await;
    let harness = InProcess::new(
        "[upstream]\nrequest_timeout = \"1h\"\nmax_buffered_body = \"1MiB\"\n",
        sim,
    );
    let mut body = unread(&harness.proxy, "/3/big?api_key=STEADY")
        .await
        .into_body();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        received += frame.expect("never cut").into_data().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received, 12 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_with_a_zero_window_starve_no_one() {
    let sim = sim().await;
    let proxy = spawn_proxy(
        "[upstream]\nmax_connections = 2\nrequest_timeout = \"30s\"\n",
        &sim.url(),
    )
    .await;
    // A client that announces a zero window: it gets headers, never a byte of body.
    let stingy = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(0)
        .build_http::<Empty<Bytes>>();
    let mut held = Vec::new();
    for id in 0..10 {
        let req = Request::get(proxy.url(&format!("/3/movie/{id}?api_key=STINGY")))
            .body(Empty::new())
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), stingy.request(req))
            .await
            .expect("headers arrive")
            .unwrap();
        held.push(response);
    }
    // Everyone else is served as usual, over the same two upstream connections.
    let client = http1_client();
    for id in 0..10 {
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            get(&client, &proxy.url(&format!("/3/movie/{id}?api_key=OTHER"))),
        )
        .await
        .expect("served while the stingy client holds its streams");
        assert_eq!(reply.status, 200);
    }
    assert!(
        sim.max_open_connections() <= 2,
        "{}",
        sim.max_open_connections()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_never_reads_a_large_body_starves_no_one() {
    // 4 MiB with a declared length: more than the kernel's socket buffers hold.
    let sim = sim_with(Sim::builder().stream("/3/big", 64 * 1024, 64, None)).await;
    let proxy = spawn_proxy(
        "[upstream]\nmax_connections = 1\nrequest_timeout = \"30s\"\n",
        &sim.url(),
    )
    .await;
    let mut stalled = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stalled
        .write_all(b"GET /3/big?api_key=STALLED HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // It never reads. Another client still gets the one upstream connection.
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        get(&http1_client(), &proxy.url("/3/movie/1?api_key=OTHER")),
    )
    .await
    .expect("served while the stalled client holds its response");
    assert_eq!(reply.status, 200);
    assert_eq!(sim.max_open_connections(), 1);
    drop(stalled);
}

/// One client connection served over an in-memory pipe of `buffer` bytes, on paused time, with a
/// 300 ms idle timeout: the client's end, and the connection's task.
fn serve_in_memory(
    sim: &Sim,
    buffer: usize,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), tmdb_proxy::upstream::BoxError>>,
) {
    let cfg = config(
        "[server]\nidle_timeout = \"300ms\"\n[upstream]\nrequest_timeout = \"1h\"\n",
        &sim.url(),
    );
    let proxy = tmdb_proxy::Proxy::in_memory(&cfg, sim.dialer()).unwrap();
    let server = tmdb_proxy::server::Server::new(&cfg.server).unwrap();
    let (client_io, server_io) = tokio::io::duplex(buffer);
    let peer = IN_PROCESS_CLIENT.parse().unwrap();
    let serving = tokio::spawn(async move { server.serve_io(server_io, peer, proxy).await });
    (client_io, serving)
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_never_cuts_a_response_still_in_progress() {
    // 320 KiB, streamed: the first 64 KiB, then nothing until the gate opens a second later, far
    // past the 300 ms idle timeout. No bytes move meanwhile, but the response is in progress.
    let gate = Arc::new(Notify::new());
    let sim = sim_with(Sim::builder().stream("/3/big", 64 * 1024, 5, Some(gate.clone()))).await;
    let (client_io, serving) = serve_in_memory(&sim, 1 << 20);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(client_io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/3/big?api_key=READER")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap();
    let mut received = first.into_data().map_or(0, |d| d.len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.notify_one();
    while let Some(frame) = body.frame().await {
        received += frame.expect("not cut").into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, 5 * 64 * 1024);
    // Answered, the connection is idle: it is closed exactly one idle timeout later.
    let answered = tokio::time::Instant::now();
    let result = serving.await.unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(answered.elapsed(), Duration::from_millis(300));
    drop(sender);
}

#[tokio::test]
async fn only_listed_pages_and_the_proxys_own_names_may_spend_the_injected_key() {
    let harness = InProcess::new(
        "[keys]\ndefault_api_key = \"DEFAULTKEY0123\"\n\
         [server]\ncors_origins = [\"https://app.example\"]\n",
        sim().await,
    );
    // A page of another origin: refused before anything is spent or sent.
    let foreign = harness
        .get_with(
            "/3/movie/1",
            &[
                ("host", "localhost:8080"),
                ("origin", "https://evil.example"),
            ],
        )
        .await;
    assert_eq!(foreign.status, 401);
    assert_eq!(foreign.json()["status_code"], 3);
    assert!(foreign.header("access-control-allow-origin").is_none());
    // A DNS-rebinding page: its own name, resolving to loopback.
    let rebound = harness
        .get_with("/3/movie/1", &[("host", "evil.example:8080")])
        .await;
    assert_eq!(rebound.status, 400);
    assert_eq!(rebound.json()["status_code"], 47);
    assert_eq!(harness.sim.hits(), 0);
    // The listed page, by the proxy's own name: its origin is named, never `*`.
    let app = harness
        .get_with(
            "/3/movie/1",
            &[
                ("host", "127.0.0.1:8080"),
                ("origin", "https://app.example"),
            ],
        )
        .await;
    assert_eq!(app.status, 200);
    assert_eq!(
        app.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(app.header("vary"), Some("origin"));
    // A preflight from an unlisted origin gets no CORS permission.
    let preflight = harness
        .call(
            Request::options("/3/movie/1")
                .header("origin", "https://evil.example")
                .header("access-control-request-method", "GET")
                .body(Empty::new())
                .unwrap(),
        )
        .await;
    assert_eq!(preflight.status, 204);
    assert!(preflight.header("access-control-allow-origin").is_none());
    // A request with its own key is not concerned: CORS as TMDB does it.
    let own = harness
        .get_with(
            "/3/movie/1?api_key=OWN",
            &[("host", "evil.example"), ("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(own.status, 200);
    assert_eq!(own.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test(start_paused = true)]
async fn an_http2_client_that_only_pings_is_idle_while_its_responses_wait_for_its_window() {
    let sim = sim().await;
    let (client_io, serving) = serve_in_memory(&sim, 1 << 20);
    // A zero window: the response's headers arrive, its body never can. The client pings every
    // 100 ms, well inside the 300 ms idle timeout.
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(0)
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_timeout(Duration::from_secs(3600))
            .keep_alive_while_idle(true)
            .handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(client_io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let started = tokio::time::Instant::now();
    let req = Request::get("http://localhost/3/movie/550?api_key=STINGY")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(started.elapsed(), Duration::ZERO);
    // Pings are no activity and a response stuck behind the client's window is no request in
    // progress: the connection is closed one idle timeout after the headers went out.
    let result = tokio::time::timeout(Duration::from_secs(60), serving)
        .await
        .expect("closed while the client keeps pinging");
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    drop(result);
    let mut body = response.into_body();
    assert!(matches!(body.frame().await, None | Some(Err(_))));
}

#[tokio::test(start_paused = true)]
async fn an_http1_client_that_stops_reading_is_closed_one_idle_timeout_later() {
    // 4 MiB, held in the proxy's buffer: the 64 KiB pipe fills at once and the client never reads.
    let sim = sim_with(Sim::builder().stream("/3/big", 64 * 1024, 64, None)).await;
    let (client_io, serving) = serve_in_memory(&sim, 64 * 1024);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(client_io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let started = tokio::time::Instant::now();
    let req = Request::get("/3/big?api_key=STALLED")
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let result = tokio::time::timeout(Duration::from_secs(60), serving)
        .await
        .expect("closed while the client does not read");
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    drop((result, response));
}
