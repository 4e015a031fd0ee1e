//! Shared by the Rust benchmarks that run the release binary: free ports, processes stopped by
//! PID, and a proxy started on a config of the bench's own.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Runs `bench` on a two-worker runtime, as the proxy under test has.
pub fn block_on<F: std::future::Future>(bench: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench)
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("an address").port()
}

/// A child process killed (by PID) when dropped.
pub struct Stopped(pub Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the release proxy (quietly; a no-op when it is up to date).
pub fn build_proxy() {
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--bin", "tmdb-proxy"])
        .status()
        .expect("cargo runs");
    assert!(built.success(), "the proxy builds");
}

/// Starts `target/release/tmdb-proxy` on free ports in front of `upstream`, with `extra` TOML
/// (sections other than `[server]`, `[admin]` and `[log]`, and no `[upstream]` besides
/// `upstream_extra`), quiet; waits until it listens.
pub fn start_proxy(
    name: &str,
    upstream: &str,
    upstream_extra: &str,
    extra: &str,
) -> (Stopped, SocketAddr) {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tmdb-proxy-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [upstream]\nbase_url = \"{upstream}\"\n{upstream_extra}\n[log]\nlevel = \"error\"\n{extra}",
            admin = free_port(),
        ),
    )
    .expect("the config is written");
    let child = Command::new("target/release/tmdb-proxy")
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .expect("the proxy starts");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    (Stopped(child), addr)
}
