//! The client listener over TLS: HTTPS with ALPN h2 and http/1.1, with a certificate made in the
//! test and trusted by the test's client only.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use support::*;
use tokio::net::TcpStream;

struct Files {
    dir: std::path::PathBuf,
    cert_pem: String,
}

/// A certificate and key for 127.0.0.1 in a temporary directory of their own (`name` keeps the
/// tests of this binary out of each other's way).
fn write_cert(name: &str) -> Files {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("tmdb-proxy-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    Files {
        dir,
        cert_pem: certified.cert.pem(),
    }
}

fn client_config(cert_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// One GET over TLS, speaking whatever ALPN settled on. Returns (protocol, status, body).
async fn get_tls(
    addr: std::net::SocketAddr,
    cert_pem: &str,
    alpn: &[&[u8]],
    path: &str,
) -> (Vec<u8>, u16, Bytes) {
    let connector = tokio_rustls::TlsConnector::from(client_config(cert_pem, alpn));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("handshake with the test certificate");
    let protocol = tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec();
    let io = TokioIo::new(tls);
    let uri = format!("https://127.0.0.1:{}{path}", addr.port());
    let response = if protocol == b"h2" {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
            .send_request(Request::get(uri).body(Empty::new()).unwrap())
            .await
            .unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "127.0.0.1")
            .body(Empty::new())
            .unwrap();
        sender.send_request(req).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (protocol, status, body)
}

#[tokio::test]
async fn tls_listener_serves_https_over_h2_and_http1() {
    let files = write_cert("serve");
    let sim = sim().await;
    let toml = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        files.dir.join("cert.pem").display(),
        files.dir.join("key.pem").display()
    );
    let proxy = spawn_proxy(&toml, &sim.url()).await;

    let (protocol, status, body) = get_tls(
        proxy.addr,
        &files.cert_pem,
        &[b"h2", b"http/1.1"],
        "/3/movie/550?api_key=TLS",
    )
    .await;
    assert_eq!(protocol, b"h2");
    assert_eq!(status, 200);
    assert!(std::str::from_utf8(&body).unwrap().contains(r#""id":550"#));

    let (protocol, status, _) = get_tls(
        proxy.addr,
        &files.cert_pem,
        &[b"http/1.1"],
        "/3/movie/551?api_key=TLS",
    )
    .await;
    assert_eq!(protocol, b"http/1.1");
    assert_eq!(status, 200);
    assert_eq!(sim.hits(), 2);

    // Plain HTTP on the TLS port gets nowhere.
    let plain = http1_client()
        .request(
            Request::get(proxy.url("/3/movie/1?api_key=TLS"))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    let _ = std::fs::remove_dir_all(&files.dir);
}

#[test]
fn tls_config_errors_name_the_key() {
    let both =
        tmdb_proxy::Config::from_toml_str("[server.tls]\ncert_file = \"/x.pem\"\n").unwrap_err();
    assert!(both.to_string().contains("server.tls"), "{both}");
    let missing = tmdb_proxy::Config::from_toml_str(
        "[server.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
    )
    .unwrap_err();
    assert!(
        missing.to_string().contains("server.tls.cert_file"),
        "{missing}"
    );
}

#[test]
fn a_file_that_is_not_a_certificate_stops_the_server_naming_the_key() {
    let files = write_cert("refuse");
    let garbage = files.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let toml = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let (cert, key) = (files.dir.join("cert.pem"), files.dir.join("key.pem"));
    for (cfg, named) in [
        (toml(&garbage, &key), "server.tls.cert_file"),
        (toml(&cert, &garbage), "server.tls.key_file"),
        // A certificate and the wrong kind of file for its key.
        (toml(&cert, &cert), "server.tls.key_file"),
    ] {
        let cfg = tmdb_proxy::Config::from_toml_str(&cfg).expect("the files exist");
        let error = tmdb_proxy::server::Server::new(&cfg.server)
            .err()
            .expect("refused");
        assert!(error.to_string().contains(named), "{error}");
    }
    let cfg = tmdb_proxy::Config::from_toml_str(&toml(&cert, &key)).unwrap();
    assert!(tmdb_proxy::server::Server::new(&cfg.server).is_ok());
    // The key is read at load, but `check` (the config's Debug) shows only its path.
    let shown = format!("{cfg:?}");
    assert!(
        shown.contains("key.pem") && !shown.contains("PRIVATE KEY"),
        "{shown}"
    );
    let _ = std::fs::remove_dir_all(&files.dir);
}
