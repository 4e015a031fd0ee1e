//! The upstream side: HTTPS with an extra trust root, and failures turned into TMDB bodies.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tmdb_proxy::sim::{Fault, Sim};
use tokio::net::TcpListener;

/// A self-signed certificate for 127.0.0.1, written as PEM to a temporary file.
struct TestCert {
    server: Arc<rustls::ServerConfig>,
    pem_path: std::path::PathBuf,
}

fn test_cert(name: &str) -> TestCert {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_der = certified.cert.der().clone();
    let key_der =
        rustls_pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .unwrap();
    let pem_path =
        std::env::temp_dir().join(format!("tmdb-proxy-{name}-{}.pem", std::process::id()));
    std::fs::write(&pem_path, certified.cert.pem()).unwrap();
    TestCert {
        server: Arc::new(server),
        pem_path,
    }
}

async fn tls_sim(cert: &TestCert) -> Sim {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Sim::builder()
        .tls(cert.server.clone())
        .start_on(listener)
        .unwrap()
}

#[tokio::test]
async fn https_upstream_trusted_through_ca_file() {
    let cert = test_cert("trusted");
    let sim = tls_sim(&cert).await;
    let toml = format!("[upstream]\nca_file = \"{}\"\n", cert.pem_path.display());
    let proxy = spawn_proxy(&toml, &format!("https://127.0.0.1:{}", sim.addr().port())).await;
    let client = http1_client();
    for id in [550, 551, 552] {
        let reply = get(&client, &proxy.url(&format!("/3/movie/{id}?api_key=TLS"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["id"], id);
    }
    // Keep-alive: one TLS connection served all three.
    assert_eq!(sim.accepted_connections(), 1);
    let _ = std::fs::remove_file(&cert.pem_path);
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_certificate_is_a_502_code_43() {
    let cert = test_cert("untrusted");
    let sim = tls_sim(&cert).await;
    let proxy = spawn_proxy("", &format!("https://127.0.0.1:{}", sim.addr().port())).await;
    let reply = get(&http1_client(), &proxy.url("/3/movie/1?api_key=TLS")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.text(),
        r#"{"success":false,"status_code":43,"status_message":"Couldn’t connect to the backend server."}"#
    );
    assert_eq!(sim.hits(), 0);
    let _ = std::fs::remove_file(&cert.pem_path);
}

#[tokio::test]
async fn refused_connection_is_a_502_code_43() {
    // Bind then drop to get a port nothing listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = spawn_proxy("", &format!("http://127.0.0.1:{port}")).await;
    let reply = get(&http1_client(), &proxy.url("/3/movie/1?api_key=REFUSED")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["status_code"], 43);
    assert_eq!(reply.json()["success"], false);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json;charset=utf-8")
    );
    // A keyed response, so it carries the rate-limit fields too.
    assert!(reply.header("ratelimit").is_some());
}

#[tokio::test(start_paused = true)]
async fn stalled_upstream_is_a_504_code_24_after_exactly_request_timeout() {
    let harness = InProcess::new(
        "[upstream]\nrequest_timeout = \"300ms\"\n",
        sim_with(Sim::builder().stall("/3/stall")).await,
    );
    let started = tokio::time::Instant::now();
    let reply = harness.get("/3/stall?api_key=SLOW").await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.text(),
        r#"{"success":false,"status_code":24,"status_message":"Your request to the backend server timed out. Try again."}"#
    );
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(harness.sim.hits(), 1);
}

/// A request body that sends one chunk, then nothing.
struct Stalled {
    sent: bool,
}

impl http_body::Body for Stalled {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.sent, true) {
            return std::task::Poll::Pending;
        }
        let chunk = bytes::Bytes::from_static(br#"{"value":"#);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_upload_gets_408_and_never_holds_an_upstream_connection() {
    let harness = InProcess::new(
        "[server]\nheader_read_timeout = \"2s\"\n[upstream]\nmax_connections = 1\n",
        sim().await,
    );
    let started = tokio::time::Instant::now();
    let upload = {
        let proxy = harness.proxy.clone();
        tokio::spawn(async move {
            let req = http::Request::post("/3/movie/550/rating?api_key=UP&session_id=S")
                .body(Stalled { sent: false })
                .unwrap();
            proxy.handle(req, IN_PROCESS_CLIENT.parse().unwrap()).await
        })
    };
    // Meanwhile the one upstream connection serves others.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(harness.get("/3/movie/1?api_key=OTHER").await.status, 200);
    let refused = upload.await.unwrap();
    assert_eq!(refused.status(), 408);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(harness.sim.hits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_gives_up_leaves_its_connection_to_the_next() {
    // Connecting takes 100 ms; four requests give up after 50, mid-connect.
    let sim = sim_with(Sim::builder().connect_latency(Duration::from_millis(100))).await;
    let harness = InProcess::new("[upstream]\nmax_connections = 4\n", sim);
    let start = tokio::time::Instant::now();
    let waiters: Vec<_> = (0..4)
        .map(|i| harness.spawn_get(&format!("/3/movie/{i}?api_key=QUIT")))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for waiter in &waiters {
        waiter.abort();
    }
    // Their connects finish anyway, into the idle list: at 100 ms the next four requests are
    // served at once, on them, instead of connecting anew.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..4 {
        assert_eq!(
            harness
                .get(&format!("/3/movie/{i}?api_key=NEXT"))
                .await
                .status,
            200
        );
    }
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(harness.sim.accepted_connections(), 4);
}

#[tokio::test(start_paused = true)]
async fn invented_keys_fill_no_one_elses_turn_at_the_pool() {
    let sim = sim_with(Sim::builder().latency(Duration::from_millis(100))).await;
    let harness = InProcess::new("[upstream]\nmax_connections = 2\n", sim);
    // A real key, answered with success before: known.
    assert_eq!(harness.get("/3/movie/1?api_key=REAL").await.status, 200);
    // A client invents 150 keys and sends two requests with each, all at once.
    let start = tokio::time::Instant::now();
    let flood: Vec<_> = (0..300)
        .map(|i| harness.spawn_get(&format!("/3/movie/{i}?api_key=INVENTED{}", i / 2)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    // The real key's next request goes as soon as a connection is free (100 ms), ahead of
    // every invented one, and is answered 100 ms later.
    let real = harness.get("/3/movie/2?api_key=REAL").await;
    assert_eq!(real.status, 200);
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    // The waiting room holds 128 (64 per connection), and the real key took the place of one
    // invented request: the rest were told at once, with a TMDB body and Retry-After, rather
    // than timing out later (503 code 9 when the room was full, 429 code 25 when their key's
    // place went to another).
    let mut refused = 0;
    for request in flood {
        let reply = request.await.unwrap();
        match reply.status.as_u16() {
            200 => {}
            503 => assert_eq!(reply.json()["status_code"], 9),
            429 => assert_code_25(&reply, 50),
            other => panic!("unexpected {other}"),
        }
        if reply.status != 200 {
            assert_eq!(reply.header("retry-after"), Some("1"));
            refused += 1;
        }
    }
    assert_eq!(refused, 300 - 2 - 127);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_answers_before_reading_an_upload_holds_up_no_other_request() {
    // The upstream answers each upload at once and reads its 512 KiB body (more than a
    // connection buffers) only 500 ms later. Connecting takes 1 ms, as a TCP handshake would.
    let sim = sim_with(
        Sim::builder()
            .fault(
                "/3/movie/550/rating",
                Fault::AnswerBeforeBody {
                    read_after: Duration::from_millis(500),
                },
            )
            .connect_latency(Duration::from_millis(1)),
    )
    .await;
    let harness = InProcess::new("[upstream]\nmax_connections = 2\n", sim);
    let start = tokio::time::Instant::now();
    let uploads: Vec<_> = (0..6)
        .map(|i| {
            let proxy = harness.proxy.clone();
            tokio::spawn(async move {
                let req =
                    http::Request::post(format!("/3/movie/550/rating?api_key=UP{i}&session_id=S"))
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from(
                            vec![b' '; 512 * 1024],
                        )))
                        .unwrap();
                let status = proxy
                    .handle(req, IN_PROCESS_CLIENT.parse().unwrap())
                    .await
                    .status();
                (status, start.elapsed())
            })
        })
        .collect();
    let mut answered = Vec::new();
    for upload in uploads {
        answered.push(upload.await.unwrap());
    }
    // Two at a time, each on a connection of its own. One that carried an upload is never
    // reused, and it keeps its place under the cap until the upstream has taken the upload in
    // and closed its end: 500 ms after the answer.
    let ms = Duration::from_millis;
    assert_eq!(
        answered,
        [1, 1, 502, 502, 1003, 1003].map(|t| (http::StatusCode::OK, ms(t)))
    );
    assert_eq!(harness.sim.max_open_connections(), 2);
    assert_eq!(harness.sim.accepted_connections(), 6);
    // A request after them gets a connection once one is free, a fresh one: it reaches the
    // upstream at once, not queued behind an upload the upstream has yet to read.
    let sent = tokio::time::Instant::now();
    assert_eq!(harness.get("/3/movie/1?api_key=NEXT").await.status, 200);
    assert_eq!(harness.arrivals_of("NEXT"), [sent + ms(501)]);
    let uploads: Vec<usize> = (harness.sim.arrivals().iter())
        .filter(|a| a.method == http::Method::POST)
        .map(|a| a.body.len())
        .collect();
    assert_eq!(uploads, [512 * 1024; 6], "every upload arrived whole");
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_has_request_timeout_from_its_turn_for_connection_and_answer_together() {
    // One upstream connection, held by a stalled request when a queued request's turn comes.
    let harness = InProcess::new(
        "[limit]\nrequests_per_second = 1\nmode = \"queue\"\nmax_wait = \"2s\"\n\
         [upstream]\nmax_connections = 1\nrequest_timeout = \"500ms\"\n",
        sim_with(Sim::builder().stall("/3/stall")).await,
    );
    let start = tokio::time::Instant::now();
    let ms = Duration::from_millis;
    assert_eq!(harness.get("/3/movie/1?api_key=K").await.status, 200);
    // K's next token comes 1.05 s after its first.
    let queued = harness.spawn_get("/3/stall?api_key=K");
    tokio::time::sleep(ms(1000)).await;
    let holder = harness.spawn_get("/3/stall?api_key=J");
    let holder = holder.await.unwrap();
    assert_eq!((holder.status.as_u16(), start.elapsed()), (504, ms(1500)));
    // The queued request waited 1.05 s for its turn, then 450 ms for the connection and 50 ms
    // for the upstream: its 500 ms ran from its turn, not from when it got the connection.
    let queued = queued.await.unwrap();
    assert_eq!((queued.status.as_u16(), start.elapsed()), (504, ms(1550)));
    assert!(
        queued.text().contains(r#""status_code":24"#),
        "{}",
        queued.text()
    );
    assert_eq!(harness.sim.hits(), 3);
}
