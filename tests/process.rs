//! The `tmdb-proxy` binary as an operator runs it: signals, reload, exit codes, and logs that
//! never show a key. Each test starts the binary (stopped by PID at the end) in front of an
//! in-process TMDB stand-in.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tmdb_proxy::sim::Sim;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `tmdb-proxy` process.
struct Process {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    config: PathBuf,
}

impl Process {
    /// Writes `toml` to a temporary file and starts the binary on it, on 127.0.0.1:0.
    async fn start(name: &str, toml: &str) -> Self {
        Self::start_with(name, toml, Command::new(env!("CARGO_BIN_EXE_tmdb-proxy"))).await
    }

    /// Starts the binary with its open-files limit set to `soft` and `hard` first, as
    /// `ulimit` in a start script would.
    async fn start_with_open_files(name: &str, toml: &str, soft: u64, hard: u64) -> Self {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_tmdb-proxy"));
        Self::start_with(name, toml, command).await
    }

    async fn start_with(name: &str, toml: &str, mut command: Command) -> Self {
        let dir = std::env::temp_dir().join(format!("tmdb-proxy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("tmdb-proxy.toml");
        std::fs::write(&config, toml).unwrap();
        let mut child = command
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env("TMDB_PROXY__SERVER__LISTEN", "127.0.0.1:0")
            .env("TMDB_PROXY__ADMIN__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = reader.next_line().await {
                if line.contains("tmdb-proxy listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let listening = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("the proxy starts within 30 s")
            .expect("the proxy logs its addresses");
        // Text (`listen=ADDR`) or JSON (`"fields":{"listen":"ADDR"}`) log line.
        let json: Option<serde_json::Value> = serde_json::from_str(&listening).ok();
        let field = |name: &str| -> SocketAddr {
            let text = match &json {
                Some(json) => json["fields"][name].as_str().map(str::to_owned),
                None => listening
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned),
            };
            text.and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {listening}"))
        };
        Self {
            addr: field("listen"),
            admin: field("admin"),
            child,
            lines,
            config,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// The process's soft and hard open-files limits, from `/proc`.
    fn open_files(&self) -> (u64, u64) {
        let pid = self.child.id().expect("still running");
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = (limits.lines())
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_owned();
        let numbers: Vec<u64> = (line.split_whitespace())
            .filter_map(|w| w.parse().ok())
            .collect();
        (numbers[0], numbers[1])
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for the process to exit; returns its exit code.
    async fn wait(mut self, within: Duration) -> Option<i32> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the process exits in time")
            .unwrap();
        let _ = std::fs::remove_dir_all(self.config.parent().unwrap());
        status.code()
    }
}

/// A config file's text for `sim`, with `extra`; the response cache is off unless `extra` has a
/// `[cache]` section (these tests count what reaches the stand-in).
fn config_for(sim: &tmdb_proxy::sim::Sim, extra: &str) -> String {
    let cache = if extra.contains("[cache]") {
        ""
    } else {
        "\n[cache]\nenabled = false\n"
    };
    format!("[upstream]\nbase_url = \"{}\"\n{extra}{cache}", sim.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_then_exits_0() {
    let sim = sim_with(Sim::builder().latency(Duration::from_millis(1500))).await;
    let proxy = Process::start("sigterm", &config_for(&sim, "")).await;
    let client = http1_client();
    let slow = {
        let (client, url) = (client.clone(), proxy.url("/3/movie/550?api_key=TERMKEY"));
        tokio::spawn(async move { get(&client, &url).await })
    };
    assert!(eventually(Duration::from_secs(10), || sim.hits() == 1).await);
    proxy.signal("TERM");
    // Not ready any more while it drains.
    let admin = proxy.admin_url("/readyz");
    let mut draining = false;
    for _ in 0..100 {
        if get(&client, &admin).await.status == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/readyz answers 503 while draining");
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request completes");
    assert_eq!(reply.json()["id"], 550);
    assert_eq!(proxy.wait(Duration::from_secs(15)).await, Some(0));
}

/// Requests in flight on every serving thread finish before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_connections_of_every_serving_thread() {
    let sim = sim_with(Sim::builder().latency(Duration::from_millis(1500))).await;
    let toml = config_for(&sim, "[server]\nworkers = 4\n");
    let proxy = Process::start("sigterm-workers", &toml).await;
    // Each on a connection of its own: the kernel spreads them over the four threads' sockets.
    let slow: Vec<_> = (0..12)
        .map(|i| {
            let url = proxy.url(&format!("/3/movie/{i}?api_key=TERMKEY{i}"));
            tokio::spawn(async move { get(&http1_client(), &url).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || sim.hits() == 12).await);
    proxy.signal("TERM");
    for (i, reply) in slow.into_iter().enumerate() {
        let reply = reply.await.unwrap();
        assert_eq!(reply.status, 200, "request {i} completes");
        assert_eq!(reply.json()["id"], i);
    }
    assert_eq!(proxy.wait(Duration::from_secs(15)).await, Some(0));
}

/// The serving threads share the port through `SO_REUSEPORT`, which must not let a second
/// proxy started on the same port take half the connections: it fails as on any taken port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_a_taken_port_exits_instead_of_sharing_it() {
    let sim = sim().await;
    let toml = config_for(&sim, "");
    let first = Process::start("port-first", &toml).await;
    let second = Command::new(env!("CARGO_BIN_EXE_tmdb-proxy"))
        .arg("--config")
        .arg(&first.config)
        .env_remove("RUST_LOG")
        .env("TMDB_PROXY__SERVER__LISTEN", first.addr.to_string())
        .env("TMDB_PROXY__ADMIN__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second proxy exits")
        .unwrap();
    assert_eq!(second.status.code(), Some(69), "EX_UNAVAILABLE");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("cannot bind the listener"), "{stderr}");
    // Every new connection still reaches the first proxy.
    for i in 0..16 {
        let reply = get(
            &http1_client(),
            &first.url(&format!("/3/movie/{i}?api_key=K")),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(sim.hits(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_file_and_refuses_an_invalid_one() {
    let sim = sim().await;
    let proxy = Process::start(
        "sighup",
        &config_for(
            &sim,
            "[limit]\nmode = \"reject\"\nrequests_per_second = 5\n",
        ),
    )
    .await;
    let client = http1_client();
    // One keep-alive connection, open across the reload.
    let mut conn = OneConnection::open(proxy.addr).await;
    for _ in 0..2 {
        assert_eq!(conn.status_for_key("A").await, 200);
    }

    std::fs::write(
        &proxy.config,
        config_for(
            &sim,
            "[limit]\nmode = \"reject\"\nrequests_per_second = 1\n",
        ),
    )
    .unwrap();
    proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .count("configuration reloaded")
            >= 1)
        .await
    );
    assert_eq!(conn.status_for_key("B").await, 200);
    assert_eq!(
        conn.status_for_key("B").await,
        429,
        "the lower limit applies on the same connection"
    );

    std::fs::write(&proxy.config, "[limit]\nrequests_per_second = \"many\"\n").unwrap();
    proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || proxy.count("reload refused")
            >= 1)
        .await
    );
    // The running configuration (limit 1) stays.
    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=C"))
            .await
            .status,
        200
    );
    assert_eq!(
        get(&client, &proxy.url("/3/movie/1?api_key=C"))
            .await
            .status,
        429
    );

    proxy.signal("TERM");
    assert_eq!(proxy.wait(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_shows_a_key_or_token() {
    let sim = sim_with(Sim::builder().json("/3/html", 502, "<html>edge error</html>")).await;
    // A key in every place a configuration can hold one.
    let secrets_toml = "[keys]\ndefault_api_key = \"DEFAULTSECRET0001\"\n\
        [keys.aliases]\nweb = \"ALIASSECRET0005\"\n\
        [[limit.overrides]]\nkey = \"OVERRIDESECRET0006\"\nrequests_per_second = 10\n\
        [[clients.apps]]\nname = \"web\"\ntoken = \"APPTOKENSECRET0008\"\napi_key = \"APPKEYSECRET0009\"\n\
        [[clients.apps]]\nname = \"batch\"\ntoken = \"APPTOKENSECRET0011\"\nalias = \"web\"\npriority = \"batch\"\n\
        [log]\nlevel = \"debug\"\n";
    let proxy = Process::start("secrets", &config_for(&sim, secrets_toml)).await;
    let client = http1_client();
    let jwt = jwt_with_aud("AUDSECRET0003");
    let bearer = format!("Bearer {jwt}");
    let requests: [(&str, Vec<(&str, &str)>); 12] = [
        (
            "/3/movie/9?api_key=QUERYSECRET0002",
            vec![("x-proxy-token", "APPTOKENSECRET0008")],
        ),
        (
            "/3/movie/10",
            vec![("proxy-authorization", "Bearer APPTOKENSECRET0011")],
        ),
        (
            "/3/movie/11",
            vec![("x-proxy-token", "UNKNOWNTOKENSECRET0010")],
        ),
        ("/3/movie/1?api_key=QUERYSECRET0002", vec![]),
        ("/3/movie/2", vec![("authorization", bearer.as_str())]),
        (
            "/3/movie/3",
            vec![("authorization", "Bearer OPAQUESECRET0004")],
        ),
        ("/3/movie/4", vec![]),
        ("/3/html?api_key=QUERYSECRET0002", vec![]),
        ("/3/movie/5?api_key=QUERYSECRET0002&page=0", vec![]),
        ("/3/movie/6?api_key=ALIASSECRET0005", vec![]),
        ("/3/movie/7?api_key=OVERRIDESECRET0006", vec![]),
        (
            "/3/movie/8?api_key=QUERYSECRET0002",
            vec![("authorization", "Bearer OPAQUESECRET0004")],
        ),
    ];
    for (path, headers) in &requests {
        get_with(&client, &proxy.url(path), headers).await;
    }
    let metrics = get(&client, &proxy.admin_url("/metrics")).await;
    // A reload of a file whose broken line holds a key is refused, naming only the place.
    let broken = format!(
        "{}[keys]\ndefault_api_key = \"BROKENSECRET0007\n",
        config_for(&sim, "")
    );
    std::fs::write(&proxy.config, &broken).unwrap();
    proxy.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || proxy.count("reload refused")
            >= 1)
        .await,
        "the broken reload is refused"
    );
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tmdb-proxy"))
        .args(["check", "--config"])
        .arg(&proxy.config)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(64));
    proxy.signal("TERM");
    let lines = proxy.log();
    assert!(proxy.wait(Duration::from_secs(15)).await == Some(0));
    assert!(
        lines.iter().any(|l| l.contains("request")),
        "requests were logged"
    );
    let mut outputs: Vec<String> = lines;
    outputs.push(metrics.text().to_owned());
    outputs.push(String::from_utf8_lossy(&check.stdout).into_owned());
    outputs.push(String::from_utf8_lossy(&check.stderr).into_owned());
    for secret in [
        "DEFAULTSECRET0001",
        "QUERYSECRET0002",
        "AUDSECRET0003",
        "OPAQUESECRET0004",
        "ALIASSECRET0005",
        "OVERRIDESECRET0006",
        "BROKENSECRET0007",
        "APPTOKENSECRET0008",
        "APPKEYSECRET0009",
        "UNKNOWNTOKENSECRET0010",
        "APPTOKENSECRET0011",
        jwt.as_str(),
    ] {
        for output in &outputs {
            assert!(!output.contains(secret), "{secret} shown: {output}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id() {
    let sim = sim().await;
    let proxy = Process::start("json", &config_for(&sim, "[log]\nformat = \"json\"\n")).await;
    let reply = get_with(
        &http1_client(),
        &proxy.url("/3/movie/1?api_key=J"),
        &[("x-request-id", "trace-me-42")],
    )
    .await;
    assert_eq!(reply.header("x-request-id"), Some("trace-me-42"));
    proxy.signal("TERM");
    let lines = proxy.log();
    assert_eq!(proxy.wait(Duration::from_secs(15)).await, Some(0));
    let line = lines
        .iter()
        .find(|l| l.contains("trace-me-42"))
        .expect("the request's log line");
    let json: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
    assert_eq!(json["span"]["id"], "trace-me-42");
    assert_eq!(json["fields"]["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_to_the_hard_one() {
    let sim = sim().await;
    let toml = config_for(&sim, "[server]\nmax_connections = 1000\n");
    let proxy = Process::start_with_open_files("nofile", &toml, 256, 4096).await;
    assert_eq!(proxy.open_files(), (4096, 4096));
    assert_eq!(
        proxy.count("open-files limit is below"),
        0,
        "{:#?}",
        proxy.log()
    );
    proxy.signal("TERM");
    assert_eq!(proxy.wait(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_files_limit_too_low_for_max_connections_is_a_warning() {
    let sim = sim().await;
    let toml = config_for(&sim, "[server]\nmax_connections = 1000\n");
    let proxy = Process::start_with_open_files("nofile-low", &toml, 256, 512).await;
    assert_eq!(proxy.open_files(), (512, 512));
    let warned = proxy
        .log()
        .into_iter()
        .find(|l| l.contains("open-files limit is below"));
    let warned = warned.unwrap_or_else(|| panic!("no warning in {:#?}", proxy.log()));
    assert!(
        warned.contains("WARN") && warned.contains("limit=512"),
        "{warned}"
    );
    // It still serves.
    let reply = get(&http1_client(), &proxy.url("/3/movie/550?api_key=K")).await;
    assert_eq!(reply.status, 200);
    proxy.signal("TERM");
    assert_eq!(proxy.wait(Duration::from_secs(10)).await, Some(0));
}
